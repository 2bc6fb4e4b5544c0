"""``vlmexport build --format tensorrt``: the TensorRT profile of the split parts.

Per precision (fp16 by default, fp32), written under ``tensorrt/`` (names from
``bundle.artifact_file``):

- ``vision_encoder`` and ``connector``: the :mod:`.onnx_vision` graphs (the connector with
  its token count fixed, one dynamic axis less to profile). They are plain opset-17 ops
  already (Conv, MatMul, LayerNormalization, Softmax, Erf, ...); the
  profile writes its own copies so that the profile is complete on its own and its
  files are what the audit checked and the engines are built from.
- ``text_decoder``: :mod:`.tensorrt_decoder` (static KV buffer, decomposed attention /
  RoPE / RMSNorm, Where-routed experts) and its routing-free ``.decode.onnx``.
- ``token_embedding``: the embedding table (the runtime looks tokens up on the host).

Every graph is audited against TensorRT's operator tables (:mod:`.tensorrt_audit`, both
targets); a node the JetPack 6 parser (TensorRT 10.3) would reject fails the build. The
audit goes into each artifact's manifest entry, with what a device needs to build its
engines (``engine_profiles``: the optimization profiles, see
``vlmexport.runtimes.tensorrt_engines``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.names import ONNX_QUANTIZED
from ..bundle import artifact_file
from ..core.errors import ConfigError
from .tensorrt_audit import TARGETS, AuditError, audit_model

TENSORRT_PRECISIONS = ("fp16", "fp32", "int8", "int4")
QUANTIZED = tuple(p.value for p in ONNX_QUANTIZED)  # decoder weights INT8 / INT4 (tensorrt_qdq); the other parts use fp16
GATING_TARGET = "jetson-orin"  # the oldest parser the bundle promises to parse on


def export_tensorrt(src, root: Path, precisions: Sequence[str], progress: Callable[[str], None] = lambda s: None,
                    int4_block: int = 128) -> list:
    """The four TensorRT-profile parts per precision; audited, described for the manifest.

    ``int8`` / ``int4``: here only the text decoder, its projection weights quantized (see
    ``tensorrt_qdq``; ``int4_block`` weights per scale) around fp16; int4's other parts run their
    fp16 profile (``runtimes.tensorrt_engines.TRT_PART_FALLBACK``), which is exported too, and
    int8's vision parts are calibrated QDQ graphs that ``pipeline.tensorrt_quant`` writes."""
    from .parts import ExportedPart, exported_part
    from .onnx_decoder import export_token_embedding
    from .onnx_vision import export_connector, export_vision_encoder
    from .tensorrt_decoder import export_tensorrt_decoder
    from .tensorrt_qdq import quantized_builder

    s = src.specs
    out: list[ExportedPart] = []
    precisions = list(precisions)
    if any(p in QUANTIZED for p in precisions) and "fp16" not in precisions:
        progress("export the fp16 TensorRT profile (the vision parts of int8/int4)")
        precisions.insert(0, "fp16")
    for p in precisions:
        if p not in TENSORRT_PRECISIONS:
            raise ConfigError(f"TensorRT-profile precision {p!r} is not supported; choose from "
                              f"{list(TENSORRT_PRECISIONS)}")
        fp = "fp16" if p in QUANTIZED else p
        builder = quantized_builder(p, int4_block) if p in QUANTIZED else None
        jobs = [
            ("vision_encoder", lambda f: export_vision_encoder(src.tensors, s.vision, f, fp)),
            ("connector", lambda f: export_connector(src.tensors, s.connector, s.vision.output_width, s.decoder.hidden_size,
                                                     f, fp, num_tokens=s.vision.output_tokens)),
            ("text_decoder", lambda f: export_tensorrt_decoder(src.tensors, s.decoder, f, fp, builder=builder,
                                                               quant_precision=p if builder else None)),
            ("token_embedding", lambda f: export_token_embedding(src.tensors, s.decoder, f, fp)),
        ]
        for part, fn in (j for j in jobs if p not in QUANTIZED or j[0] == "text_decoder"):
            progress(f"export {part} (tensorrt {p})")
            rel = artifact_file(part, "tensorrt", p)
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            g = fn(target)
            e = exported_part(part, p, rel, g, root, time.perf_counter() - t0)
            extra: dict = {}
            if part != "token_embedding":
                graphs = [target] + ([g.decode_path] if getattr(g, "decode_path", None) else [])
                extra["audit"] = audit_graphs(graphs, root)
                if getattr(g, "decode_path", None):
                    extra["decode_graph"] = str(Path(g.decode_path).relative_to(root))
                if part == "text_decoder":
                    extra["kv_layout"] = "static"
                    if builder:
                        extra["quantization"] = {"weights": p, "scheme": "weight-only DequantizeLinear, symmetric",
                                                 "int4_block": int4_block if p == "int4" else None,
                                                 "float_type": "fp16", "opset": g.opset}
            out.append(ExportedPart(part, "tensorrt", p, e.file, e.data_files, e.inputs, e.outputs, e.seconds, extra))
    return out


def audit_graphs(paths: Sequence[Path], root: Path, targets: Sequence[str] = TARGETS) -> dict:
    """``{relative path: {target: audit dict}}``; raises :class:`AuditError` when the gating
    target's parser would reject a node."""
    report: dict = {}
    for path in paths:
        rel = str(Path(path).relative_to(root))
        report[rel] = {}
        for t in targets:
            r = audit_model(path, t)
            report[rel][t] = r.to_dict()
            if not r.ok and t == GATING_TARGET:
                raise AuditError(f"{rel}: {len(r.findings)} node(s) TensorRT {r.tensorrt} ({t}) would not parse, "
                                 f"first: {r.findings[0]}; this is an exporter bug, report it")
    return report
