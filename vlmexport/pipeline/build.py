"""``vlmexport build``: load -> export -> validate -> package, each a function with a
typed result, writing one bundle atomically (nothing appears at ``out`` unless every
stage, validation included, succeeded).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..bundle import BundleWriter, artifact_file
from ..core.atomic import output_lock
from ..core.errors import ConfigError
from ..core.names import GGUF_QUANTIZED, ONNX_FLOAT, ONNX_QUANTIZED, PRECISION_NAMES, Format, Part, precision_in
from ..core.preprocess import PreprocessConfig
from ..core.prompt import CHAT_TEMPLATE_FILE, ChatTemplate
from ..exporter.onnx_decoder import export_text_decoder, export_token_embedding
from ..exporter.onnx_vision import export_connector, export_vision_encoder
from ..exporter.parts import ExportedPart, exported_part
from ..models.base import VLM, VLMConfig
from ..models.checkpoint import (INDEX, PREPROCESSOR, WEIGHTS, CanonicalTensors, SafetensorsCheckpoint,
                                 read_chat_template, read_config, read_preprocess, read_tokenizer)
from ..models.spec import PartSpecs
from .deviations import (DeviationRefused, PartialBuildError, deviation_record,  # noqa: F401
                         drop_failed_formats, planned_deviations)

log = logging.getLogger(__name__)

FORMATS = (Format.ONNX, Format.GGUF, Format.TENSORRT)
ONNX_PRECISIONS = ONNX_FLOAT
ONNX_QUANT_PRECISIONS = ONNX_QUANTIZED  # vlmexport/quant: calibrated from fp32, gated against it
IMATRIX_FILE = "gguf/model.imatrix.gguf"


def precisions_for(formats: Sequence[str], precisions: Sequence[str]) -> dict[str, list[str]]:
    """Spread the requested precisions over the requested formats (each where it exists)."""
    plan: dict[str, list[str]] = {f: [] for f in formats}
    for p in precisions:
        hits = [f for f in formats if precision_in(f, p) is not None]
        if not hits:
            known = sorted({k for f in formats for k in PRECISION_NAMES[f]})
            raise ConfigError(f"precision {p!r} exists in none of the formats {list(formats)}; choose from {known}")
        for f in hits:
            name = precision_in(f, p)
            if name not in plan[f]:
                plan[f].append(name)
    empty = [f for f, ps in plan.items() if not ps]
    if empty:
        raise ConfigError(f"no precision given for format(s) {empty}; add one to --precision")
    return plan
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SourceModel:
    """A model directory opened for export: config and lazily readable tensors."""

    path: Path
    arch: type[VLM]
    config: VLMConfig
    hf_config: dict
    specs: PartSpecs
    tensors: CanonicalTensors
    preprocess: PreprocessConfig
    template: ChatTemplate
    num_parameters: int

    @property
    def image_tokens(self) -> int:
        return self.specs.image_tokens

    def layout_options(self) -> dict:
        """``build_layout``'s image arguments: what an image's positions hold and where it goes."""
        x = self.specs.decoder.cross_attention
        return dict(image_pad_id=self.config.pad_token_id if x is None else x.placeholder_id,
                    image_placement=self.specs.decoder.image_placement)

    def model_section(self) -> dict:
        c, d = self.config, self.specs.decoder
        return {
            "arch": self.arch.arch_name, "num_parameters": self.num_parameters, "image_tokens": self.image_tokens,
            "image_size": c.vision_config.image_size, "expert_routing": c.expert_routing,
            "position_ids": c.position_ids, "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
            "num_layers": d.num_layers,
            "num_heads": d.num_heads, "num_kv_heads": d.num_kv_heads, "head_dim": d.head_dim,
            "vocab_size": d.vocab_size, "max_length": d.max_position_embeddings, "has_experts": d.has_experts,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "gguf_arch": d.gguf_arch or self.arch.gguf_arch, "hf_config": self.hf_config,
            **({} if d.cross_attention is None else {  # written only where not the default (splice)
                "image_placement": d.image_placement,
                "image_token_id": d.cross_attention.placeholder_id}),
        }


def load_source(model_dir: str | Path) -> SourceModel:
    path = Path(model_dir)
    arch, config, hf = read_config(path)
    tensors = CanonicalTensors(SafetensorsCheckpoint(path), arch)
    pre = read_preprocess(path, arch, config)
    read_tokenizer(path)  # a bundle needs the model's tokenizer: refuse now, not after the export
    template = read_chat_template(path, arch, config)
    return SourceModel(path=path, arch=arch, config=config, hf_config=hf, specs=arch.part_specs(config),
                       tensors=tensors, preprocess=pre, template=template, num_parameters=tensors.num_parameters())


# ---------------------------------------------------------------------- export
def export_onnx(src: SourceModel, root: Path, precisions: Sequence[str], progress: Progress = lambda s: None
                ) -> list[ExportedPart]:
    """The four ONNX-format parts per precision, streamed from the checkpoint."""
    out: list[ExportedPart] = []
    s = src.specs
    for p in [p for p in precisions if p not in ONNX_QUANT_PRECISIONS]:  # quantized ones: quantize_onnx_parts
        if p not in ONNX_PRECISIONS:
            raise ConfigError(f"ONNX precision {p!r} is not supported here; choose from "
                              f"{list(ONNX_PRECISIONS + ONNX_QUANT_PRECISIONS)}")
        jobs = [
            (Part.VISION_ENCODER, lambda f: export_vision_encoder(src.tensors, s.vision, f, p)),
            (Part.CONNECTOR, lambda f: export_connector(src.tensors, s.connector, s.vision.output_width,
                                                        s.decoder.hidden_size, f, p)),
            # with its routing-free one-token graph (a ~0.1 MB file over the same weights): the source of
            # the quantized decoders' decode graphs (quant/decode_graph.py)
            (Part.TEXT_DECODER, lambda f: export_text_decoder(src.tensors, s.decoder, f, p, decode_model=True)),
            (Part.TOKEN_EMBEDDING, lambda f: export_token_embedding(src.tensors, s.decoder, f, p)),
        ]
        for part, fn in jobs:
            progress(f"export {part} ({p})")
            rel = artifact_file(part, "onnx", p)
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            g = fn(target)
            e = exported_part(part, p, rel, g, root, time.perf_counter() - t0)
            if getattr(g, "decode_path", None):
                e.extra["decode_graph"] = str(Path(g.decode_path).relative_to(root))
            out.append(e)
    return out


def quantize_onnx_parts(src: SourceModel, root: Path, precisions: Sequence[str], exported: Sequence[ExportedPart],
                        options=None, progress: Progress = lambda s: None) -> tuple[list[ExportedPart], dict]:
    """INT8/INT4 ONNX parts quantized from the fp32 ones, scored against fp32 and gated
    (vlmexport/quant); and the manifest's ``calibration`` entry for them. A build that did not
    ask for fp32 gets it too: it is the source, and the runtime's per-part fallback (an int4
    bundle has no int4 vision encoder)."""
    from ..quant.decode_graph import derive_quantized_decode_graph
    from .quantize import QuantOptions, quantize_onnx

    options = options or QuantOptions()
    new: list[ExportedPart] = []
    fp32 = [e for e in exported if e.format == "onnx" and e.precision == "fp32"]
    if not fp32:
        progress("export fp32 parts (the quantization source and fallback)")
        fp32 = new = export_onnx(src, root, ["fp32"], progress)
    t0 = time.perf_counter()
    r = quantize_onnx({e.part: root / e.file for e in fp32}, root, precisions,
                      tokenizer_path=read_tokenizer(src.path).path,
                      template=src.template, preprocess=src.preprocess, model=src.model_section(), arch=src.arch,
                      options=options, progress=progress)
    dt = time.perf_counter() - t0
    io = {e.part: e for e in fp32}
    parts = []
    for q in r.parts:
        data = [str(f.relative_to(root)) for f in q.data_files]
        extra = {"quantization": q.settings, "quantized_nodes": len(q.quantized_nodes),
                 "scores": {k: v for k, v in r.scores[q.precision].items() if k != "parts"}}
        fp32_decode = (io[q.part].extra or {}).get("decode_graph")
        if fp32_decode and q.part == Part.TEXT_DECODER:  # the routing-free graph over the quantized weights
            progress(f"decode graph of the {q.precision} text decoder")
            d, extra["decode_graph_weight_bytes"] = derive_quantized_decode_graph(q.path, root / fp32_decode)
            extra["decode_graph"] = str(d.relative_to(root))
            data.append(extra["decode_graph"])
        parts.append(ExportedPart(q.part, "onnx", q.precision, str(q.path.relative_to(root)), tuple(data),
                                  io[q.part].inputs, io[q.part].outputs, dt, extra))
    return new + parts, {"onnx": {**r.calibration, "scores": r.scores}}


def export_gguf_parts(src: SourceModel, root: Path, precisions: Sequence[str],
                      progress: Progress = lambda s: None, imatrix_pairs: int = 64
                      ) -> tuple[list[ExportedPart], list[str]]:
    """Text GGUF + mmproj GGUF per precision (our own writer, streamed), and the
    semantics deviations llama.cpp introduces for this model."""
    from ..exporter.gguf_writer import export_gguf

    parts: list[ExportedPart] = []
    deviations: list[str] = []
    for p in precisions:
        if p in GGUF_QUANTIZED:
            continue
        progress(f"export gguf ({p})")
        t0 = time.perf_counter()
        e = export_gguf(src.path, root / "gguf", outtype=p, name="model", tensors=src.tensors)
        dt = time.perf_counter() - t0
        for part, path in ((Part.TEXT_DECODER, e.text), (Part.MMPROJ, e.mmproj)):
            rel = artifact_file(part, "gguf", p)
            if Path(path).resolve() != (root / rel).resolve():
                raise RuntimeError(f"the GGUF writer wrote {path}, not {rel}")
            parts.append(ExportedPart(part, "gguf", p, rel, (), (), (), dt, {"gguf_arch": e.gguf_arch}))
        deviations += [d for d in e.deviations if d not in deviations]
    quantized = [p for p in precisions if p in GGUF_QUANTIZED]
    if quantized:
        q_parts, q_dev = quantize_gguf_parts(src, root, quantized, imatrix_pairs, progress)
        parts += q_parts
        deviations += [d for d in q_dev if d not in deviations]
    return parts, deviations


def quantize_gguf_parts(src: SourceModel, root: Path, precisions: Sequence[str], imatrix_pairs: int = 64,
                        progress: Progress = lambda s: None) -> tuple[list[ExportedPart], list[str]]:
    """q8_0 / q4_k_m / q4_0 text GGUFs from the f16 one (llama.cpp's quantizer, with an importance
    matrix from ``imatrix_pairs`` image+prompt pairs of the synthetic val split; 0: none) and the
    q8_0 mmproj they pair with (the same quantizer). The f16 GGUFs come from the bundle if it has
    them, else they are written to a temporary directory."""
    import tempfile

    from ..exporter.gguf_writer import GGUFSource, export_gguf
    from ..quant.gguf_quantize import (
        MMPROJ_FOR,
        quantize_mmproj_gguf,
        quantize_text_gguf,
    )

    parts: list[ExportedPart] = []
    deviations: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vlmexport-gguf-") as tmp:
        f16 = root / artifact_file(Part.TEXT_DECODER, "gguf", "f16")
        mm16 = root / artifact_file(Part.MMPROJ, "gguf", "f16")
        if not (f16.is_file() and mm16.is_file()):
            progress("export gguf (f16, the quantizer's input)")
            e = export_gguf(src.path, tmp, outtype="f16", name="model", tensors=src.tensors)
            f16, mm16 = e.text, e.mmproj
            deviations += list(e.deviations)
        means = None
        extra_im: dict = {"imatrix": None}
        if imatrix_pairs > 0:
            progress(f"imatrix ({imatrix_pairs} image+prompt pairs)")
            im, im_seconds = compute_bundle_imatrix(src, imatrix_pairs)
            from ..quant.imatrix import write_imatrix

            write_imatrix(root / IMATRIX_FILE, im)
            means = im.means()
            extra_im = {"imatrix": IMATRIX_FILE, "imatrix_pairs": im.chunks, "imatrix_dataset": list(im.datasets),
                        "imatrix_seconds": round(im_seconds, 3)}
        gsrc = GGUFSource.open(src.path, src.tensors)
        written_mmproj: set[str] = set()
        for p in precisions:
            mm_type = MMPROJ_FOR[p]
            mm_rel = artifact_file(Part.MMPROJ, "gguf", mm_type)
            if mm_type not in written_mmproj and not (root / mm_rel).is_file():
                progress(f"quantize gguf mmproj ({mm_type})")
                quantize_mmproj_gguf(mm16, root / mm_rel, mm_type)
            written_mmproj.add(mm_type)
            progress(f"quantize gguf ({p})")
            rel = artifact_file(Part.TEXT_DECODER, "gguf", p)
            r = quantize_text_gguf(f16, root / rel, p, imatrix=means)
            counts: dict[str, int] = {}
            for t in r.types.values():
                counts[t] = counts.get(t, 0) + 1
            extra = {"gguf_arch": gsrc.gguf_arch, "quantizer": "llama.cpp llama_model_quantize", Part.MMPROJ: mm_rel,
                     "tensor_types": dict(sorted(counts.items())), "experts_pinned": r.pinned, **extra_im}
            parts.append(ExportedPart(Part.TEXT_DECODER, "gguf", p, rel, (), (), (), r.seconds, extra))
            parts.append(ExportedPart(Part.MMPROJ, "gguf", p, mm_rel, (), (), (), 0.0,
                                      {"gguf_arch": "clip", "outtype": mm_type}))
    return parts, deviations


def compute_bundle_imatrix(src: SourceModel, pairs: int):
    """The multimodal importance matrix of ``src`` (see quant/imatrix.py)."""
    import torch

    from ..exporter.gguf_writer import GGUFSource, plan_text
    from ..models.checkpoint import load_pretrained
    from ..quant.imatrix import calibration_runs, compute_imatrix, synthetic_items

    t0 = time.perf_counter()
    loaded = load_pretrained(src.path, dtype=torch.float32)
    items = synthetic_items(src.preprocess.image_size, pairs, split="val")
    plan = plan_text(GGUFSource.open(src.path, src.tensors), "f16")
    runs = calibration_runs(loaded.model, loaded.tokenizer, src.preprocess, src.template, items)
    im = compute_imatrix(loaded.model, plan, runs, dataset=f"synthetic-vqa:val:{len(items)}")
    return im, time.perf_counter() - t0


def copy_reference(src: SourceModel, root: Path) -> ExportedPart:
    """The PyTorch reference checkpoint (for the ``torch`` backend) under ``torch/``."""
    rel_dir = Path(artifact_file("model", "torch", "reference"))
    dest = root / rel_dir
    dest.mkdir(parents=True, exist_ok=True)
    names = ["config.json"] + [f.name for f in read_tokenizer(src.path).files()]
    if (src.path / PREPROCESSOR).is_file():
        names.append(PREPROCESSOR)
    else:  # transformers 5 / THUDM layouts: the reference gets the image processor as a file of its own
        src.preprocess.save(dest / PREPROCESSOR)
    if (src.path / INDEX).is_file():
        names.append(INDEX)
        names += sorted({v for v in json.loads((src.path / INDEX).read_text())["weight_map"].values()})
    else:
        names.append(WEIGHTS)
    # the chat template is the bundle's own chat_template.jinja (one file, read by every backend)
    for n in names:
        shutil.copyfile(src.path / n, dest / n)
    if PREPROCESSOR not in names:
        names.append(PREPROCESSOR)
    files = [str(rel_dir / n) for n in names]
    return ExportedPart("model", "torch", "reference", str(rel_dir / "config.json"), tuple(files[1:]), (), (), 0.0)


# -------------------------------------------------------------------- package
def write_common_files(src: SourceModel, w: BundleWriter) -> None:
    tok = read_tokenizer(src.path)
    for f in tok.files():
        w.add_file(f.name, f)
    src.preprocess.save(w.path(PREPROCESSOR))
    w.path(CHAT_TEMPLATE_FILE).write_text(src.template.jinja)
    w.set_section("model", src.model_section())
    w.set_section("tokenizer", {"file": tok.path.name, "type": tok.kind, "vocab_size": tok.vocab_size,
                                "bos_id": tok.bos_id, "eos_id": tok.eos_id})
    w.set_section("preprocessing", {"file": PREPROCESSOR, **src.preprocess.as_dict()})
    w.set_section("chat_template", {"file": CHAT_TEMPLATE_FILE, **src.template.settings()})


def add_artifacts(w: BundleWriter, parts: Sequence[ExportedPart]) -> None:
    for e in parts:
        w.add_artifact(e.part, e.format, e.precision, e.file, inputs=e.inputs, outputs=e.outputs,
                       data_files=e.data_files, extra={"export_seconds": round(e.seconds, 3), **e.extra})


# ----------------------------------------------------------------------- build
@dataclass
class BuildResult:
    out: Path
    artifacts: list[ExportedPart]
    validation: dict = field(default_factory=dict)
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)  # the manifest's section: int8/int4 scores and gates


def build(model_dir: str | Path | None, out: str | Path, formats: Sequence[str] = ("onnx",),
          precisions: Sequence[str] = ("fp32", "fp16"), reference: bool = True, validate: bool = True,
          e2e_prompts: int = 50, progress: Progress = lambda s: None, imatrix_pairs: int = 64,
          quant=None, allow_deviations: bool = False) -> BuildResult:
    """Build a bundle from a model directory (default: the shipped demo model).

    ``quant`` (a :class:`vlmexport.pipeline.quantize.QuantOptions`) configures the int8/int4 ONNX parts.
    A format that cannot run the model as it is (a GGUF of ``hf_cogvlm`` semantics, llama.cpp's
    llava projector) is refused before any work unless ``allow_deviations``; then it is built,
    what it runs is measured against PyTorch and recorded (manifest and model card). A format
    that fails validation is left out of the bundle and the others are kept: the bundle is
    written and :class:`PartialBuildError` then says what was left out."""
    from ..assets import demo_model_dir

    t0 = time.perf_counter()
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    plan = precisions_for(formats, precisions)
    progress("load")
    src = load_source(model_dir if model_dir is not None else demo_model_dir())
    deviations = planned_deviations(src, plan, allow_deviations)
    if "tensorrt" in plan:  # refused before any work, like a GGUF llama.cpp cannot run
        from ..exporter.tensorrt_decoder import check_tensorrt_decoder

        check_tensorrt_decoder(src.specs.decoder)
    with output_lock(out, "build"), BundleWriter(out) as w:  # a second build of `out` fails at once
        write_common_files(src, w)
        parts: list[ExportedPart] = []
        q_section: dict = {}
        if reference:
            progress("copy the PyTorch reference")
            parts.append(copy_reference(src, w.root))
        if "onnx" in plan:
            parts += export_onnx(src, w.root, plan["onnx"], progress)
            quantized = [p for p in plan["onnx"] if p in ONNX_QUANT_PRECISIONS]
            if quantized:
                q_parts, q_section = quantize_onnx_parts(src, w.root, quantized, parts, quant, progress)
                parts += q_parts
                w.set_section("calibration", q_section)
        if "gguf" in plan:
            gguf_parts, _ = export_gguf_parts(src, w.root, plan["gguf"], progress, imatrix_pairs)
            parts += gguf_parts
        if "tensorrt" in plan:
            from ..exporter.tensorrt import export_tensorrt

            parts += export_tensorrt(src, w.root, plan["tensorrt"], progress)
            if "int8" in plan["tensorrt"]:  # explicit symmetric QDQ vision parts, calibrated like the onnx int8 ones
                from .tensorrt_quant import quantize_tensorrt_vision

                parts += quantize_tensorrt_vision(src, w.root, quant, progress)
        report: dict = {"skipped": True}
        if validate:
            from .validate import validate_exports

            # quantized ONNX parts are scored against fp32 by their own gates (quantize_onnx_parts)
            report = validate_exports(src, w.root, [p for p in parts if p.format in ("onnx", "gguf") and not (
                p.format == "onnx" and p.precision in ONNX_QUANT_PRECISIONS)], e2e_prompts,
                                      progress)
            trt = [p for p in parts if p.format == "tensorrt"]
            if trt:
                from .tensorrt_validate import validate_tensorrt_profile

                t_report = validate_tensorrt_profile(src, w.root, trt, e2e_prompts, progress)
                # add the profile's rows; keep what validate_exports recorded (failed formats, measurements)
                report = {**report, **{k: report.get(k, []) + t_report[k] for k in ("parts", "end_to_end")}}
        parts, dropped = drop_failed_formats(report, parts, w.root)
        for fmt, what in deviations.items():
            if fmt not in dropped:
                w.add_semantics_deviation(deviation_record(fmt, what, report if validate else None))
        add_artifacts(w, parts)
        w.set_section("validation", report)
        progress("package")
    if dropped:
        raise PartialBuildError(f"{', '.join(dropped)} failed validation and {'was' if len(dropped) == 1 else 'were'} "
                                f"left out of the bundle written to {out} ({report['failed'][0]['error']}); the "
                                f"manifest records the failure: fix it and rebuild, or build without that format")
    return BuildResult(Path(out), parts, report, time.perf_counter() - t0, q_section)
