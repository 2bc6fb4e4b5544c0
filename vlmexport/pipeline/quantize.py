"""``calibrate -> quantize -> score`` for a bundle's ONNX parts (what ``vlmexport build
--precision int8,int4`` runs after the fp32 export).

Per precision:
- ``int8``: vision_encoder + connector INT8 static QDQ, text_decoder INT8 weight-only;
- ``int4``: text_decoder INT4 weight-only (the vision parts stay as they are: a runtime
  asked for int4 falls back to fp32 for parts without an int4 file).
Every set is then scored against the fp32 ONNX parts on test-split prompts and gated
(:mod:`.gates`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..bundle import artifact_file, part_precision
from ..core.errors import ConfigError
from ..core.names import ONNX_QUANTIZED, Part
from ..quant.calib import CalibrationSettings, build_calibration, decoder_feeds, feature_reader, pixel_reader
from ..quant.gates import Gate, check_gates, score, task_scores
from ..quant.quantize import (
    CPU_BLOCK,
    CPU_INT8_REDUCE_RANGE,
    CPU_INT8_UNSIGNED_ACTIVATIONS,
    DEFAULT_ALGORITHM,
    DEFAULT_CALIBRATION_METHOD,
    QuantizedPart,
    quantize_int8_static,
    quantize_weight_only,
)
from ..quant.recipe import QuantRecipe, default_recipe, for_precision
from ..runtimes.spec import decoder_shape, model_spec

log = logging.getLogger(__name__)

QUANT_PRECISIONS = tuple(p.value for p in ONNX_QUANTIZED)
PARTS_FOR = {"int8": (Part.VISION_ENCODER, Part.CONNECTOR, Part.TEXT_DECODER), "int4": (Part.TEXT_DECODER,)}


@dataclass(frozen=True)
class QuantOptions:
    calibration: CalibrationSettings = CalibrationSettings()
    recipe: QuantRecipe | None = None  # None: the architecture's default
    calibration_method: str = DEFAULT_CALIBRATION_METHOD
    algorithm: str = DEFAULT_ALGORITHM
    block_size: int = CPU_BLOCK
    accuracy_level: int | None = 4
    gates: Mapping[str, Gate] = field(default_factory=dict)  # per precision; default gates.DEFAULT_GATES
    allow_degraded: bool = False
    # test-split items per category for the gates: 40 x 7 categories = 280 prompts, so one flipped
    # answer moves accuracy by 0.36 points, below the int8 gate (0.5); fewer items make it a coin toss
    eval_per_category: int = 200  # 1,400 questions: one answer is 0.07 points, well under the 0.5-point int8 gate
    accuracy: bool = True
    cache_dir: str | None = None
    # the int8 QDQ vision parts' weights on 7 bits: the cpu target's choice (quant.quantize.CPU_INT8_REDUCE_RANGE)
    int8_reduce_range: bool = CPU_INT8_REDUCE_RANGE
    # ... and their activations as uint8 + 128 (quant.quantize.CPU_INT8_UNSIGNED_ACTIVATIONS)
    int8_unsigned_activations: bool = CPU_INT8_UNSIGNED_ACTIVATIONS
    # score the runtime's int8-GEMM prefill of each quantized decoder too (runtimes/cpu_prefill.py):
    # a second pass over the gate prompts; what lets vlmexport.load use it on CPUs without VNNI
    cpu_prefill_gate: bool = True

    @staticmethod
    def for_target(target: str, block_size: int | None = None) -> dict:
        """Block size and accuracy level of the decoder's weight-only MatMulNBits (the int4 layers,
        the 8-bit LM head and an int8 decoder alike) for ``cpu`` or ``gpu``: block 128 for both (the
        CUDA kernels' native size, and on a CPU 1.26-1.31x the decode speed of block 32 for 0.14
        points of demo accuracy, docs/quantization.md); ``block_size`` overrides the target's.

        ``accuracy_level`` is 4 (int8 compute) for both: onnxruntime's CPU kernel runs 3.6x
        faster with it than with the fp32-compute levels (bench-s shapes on a 2-vCPU EPYC:
        block 128, 57 vs 206 us per 1024x2816 MatMul), and the CUDA kernel does not read the
        attribute, so a gpu-target file also runs well on a CPU.

        ``int8_reduce_range``: the int8 vision parts' weights on 7 bits for ``cpu`` (x86 CPUs without
        VNNI saturate with 8-bit ones), full 8 bits for ``gpu`` (:data:`quant.quantize.CPU_INT8_REDUCE_RANGE`).
        ``int8_unsigned_activations``: their activations stored as uint8 + 128 for ``cpu`` (every
        MatMul fuses into onnxruntime's integer kernel), symmetric int8 for ``gpu`` (TensorRT's form):
        :data:`quant.quantize.CPU_INT8_UNSIGNED_ACTIVATIONS`.
        ``cpu_prefill_gate``: score the runtime's int8-GEMM cpu prefill for ``cpu`` only (a gpu
        target's decoder runs its prompt on CUDA).
        """
        from ..quant.quantize import GPU_BLOCK, GPU_INT8_REDUCE_RANGE, GPU_INT8_UNSIGNED_ACTIVATIONS

        table = {"cpu": (CPU_BLOCK, CPU_INT8_REDUCE_RANGE, CPU_INT8_UNSIGNED_ACTIVATIONS),
                 "gpu": (GPU_BLOCK, GPU_INT8_REDUCE_RANGE, GPU_INT8_UNSIGNED_ACTIVATIONS)}
        if target not in table:
            raise ConfigError(f"quantization target {target!r}: choose one of {list(table)}")
        block, reduce_range, unsigned = table[target]
        return {"block_size": block if block_size is None else int(block_size), "accuracy_level": 4,
                "int8_reduce_range": reduce_range, "int8_unsigned_activations": unsigned,
                "cpu_prefill_gate": target == "cpu"}

    def __post_init__(self) -> None:
        from ..quant.quantize import (
            CALIBRATION_METHODS,
            INT4_BLOCK_SIZES,
            WEIGHT_ONLY_ALGORITHMS,
        )

        if self.block_size not in INT4_BLOCK_SIZES:
            raise ConfigError(f"int4 block size {self.block_size}: choose one of {list(INT4_BLOCK_SIZES)}")

        if self.algorithm not in WEIGHT_ONLY_ALGORITHMS:
            raise ConfigError(f"int4 algorithm {self.algorithm!r}: choose one of {list(WEIGHT_ONLY_ALGORITHMS)}")
        if self.eval_per_category < 2 or self.eval_per_category % 2:
            raise ConfigError(f"gate items per category must be an even number >= 2 (yes/no questions come in "
                              f"pairs), got {self.eval_per_category}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration method {self.calibration_method!r}: choose one of "
                              f"{list(CALIBRATION_METHODS)}")


@dataclass(frozen=True)
class QuantResult:
    parts: list[QuantizedPart]
    scores: dict  # precision -> scores + gate results
    calibration: dict


def prompt_pipeline(tokenizer_path, template, preprocess, model: dict, session=None):
    """A :class:`Pipeline` for prompts/layouts (``prepare``); ``session`` may be None."""
    from ..core.tokenizer import Tokenizer
    from ..runtimes.pipeline import Pipeline

    return Pipeline(session, Tokenizer(tokenizer_path), template, preprocess, model_spec(model))


def ort_session(files: Mapping[str, Path], model: dict, threads: int = 1, **cpu_prefill):
    """``cpu_prefill``: OrtModelSession's ``cpu_prefill`` and ``cpu_prefill_cache``."""
    from ..runtimes.onnxruntime_backend import OrtModelSession

    return OrtModelSession(files[Part.TEXT_DECODER], files[Part.TOKEN_EMBEDDING], decoder_shape(model),
                           vision_encoder_path=files[Part.VISION_ENCODER], connector_path=files[Part.CONNECTOR],
                           providers=["CPUExecutionProvider"], intra_op_num_threads=threads, **cpu_prefill)


CPU_PREFILL_KEYS = ("prompts", "accuracy", "accuracy_drop_points", "mme_score", "mme_drop", "top1_agreement", "mean_cosine",
                    "gates", "passed")


def score_cpu_prefill(ref_pipe, files: Mapping[str, Path], items, precision: str, *, tokenizer_path, template,
                      preprocess, model: dict, options: "QuantOptions", reference: dict | None) -> dict | None:
    """The same scores and gate for the runtime's int8-GEMM prefill of this decoder
    (runtimes/cpu_prefill.py; the decode steps on the decoder itself), which ``vlmexport.load``
    uses on x86 CPUs without VNNI only when this passed. None for a decoder it does not apply to."""
    import tempfile

    from ..runtimes.cpu_prefill import FORMAT_VERSION, convertible

    if not convertible(files[Part.TEXT_DECODER]):
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="vlmexport-cpu-prefill-") as cache:
            session = ort_session(files, model, cpu_prefill="int8", cpu_prefill_cache=cache)
            weight_bytes = sum(f.stat().st_size for f in session.prefill_path.parent.iterdir())  # its session reads
            q_pipe = prompt_pipeline(tokenizer_path, template, preprocess, model, session)
            s = score(ref_pipe, q_pipe, items, accuracy=options.accuracy, reference=reference)
            del q_pipe, session
    except Exception as exc:  # an optional runtime path: recorded as not passed, the build goes on
        log.warning("%s: the int8-GEMM cpu prefill was not scored (%s); the runtime will not use it", precision, exc)
        return {"passed": False, "error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                "format_version": FORMAT_VERSION}
    gated = check_gates(s, precision, options.gates.get(precision), allow_degraded=True)
    return {**{k: gated[k] for k in CPU_PREFILL_KEYS if k in gated}, "weight_bytes": weight_bytes,
            "format_version": FORMAT_VERSION}


def gate_items(image_size: int, per_category: int, seed: int = 0) -> list:
    from ..data import SyntheticVQA

    return SyntheticVQA(image_size=image_size, seed=seed).eval_items("test", per_category)


def recipe_for(options: "QuantOptions", arch) -> QuantRecipe:
    """The options' recipe over the architecture's default (or the default alone)."""
    return options.recipe.over(default_recipe(arch)) if options.recipe is not None else default_recipe(arch)


def calibration_for(tokenizer_path, template, preprocess, model: dict, options: "QuantOptions"):
    """The calibration set (cached) for a model's tokenizer, template and preprocessing."""
    prep = prompt_pipeline(tokenizer_path, template, preprocess, model)
    tok_hash = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()[:16]
    return build_calibration(prep, options.calibration, options.cache_dir, identity={"tokenizer": tok_hash})


def quantize_onnx(fp32: Mapping[str, Path], root: Path, precisions: Sequence[str], *, tokenizer_path, template,
                  preprocess, model: dict, arch=None, options: QuantOptions = QuantOptions(),
                  progress: Callable[[str], None] = lambda s: None) -> QuantResult:
    """Quantize the fp32 ONNX parts ``fp32`` (part -> file) into ``root`` (bundle file names) and score them."""
    import numpy as np
    from safetensors.numpy import load_file

    bad = [p for p in precisions if p not in QUANT_PRECISIONS]
    if bad:
        raise ConfigError(f"not quantized precisions {bad}; choose from {list(QUANT_PRECISIONS)}")
    recipe = recipe_for(options, arch)
    progress("calibrate: build the calibration set")
    calib = calibration_for(tokenizer_path, template, preprocess, model, options)
    ref = ort_session(fp32, model)
    facts = decoder_shape(model)
    parts: list[QuantizedPart] = []
    # the target's int8 QDQ file form (the vision parts): 7-bit weights, uint8 + 128 activations
    int8_form = {"reduce_range": options.int8_reduce_range, "unsigned_activations": options.int8_unsigned_activations}
    for precision in precisions:
        r = recipe
        for part in PARTS_FOR[precision]:
            r = for_precision(r, part, precision)
            out = root / artifact_file(part, "onnx", precision)
            progress(f"quantize {part} ({precision})")
            if part == Part.VISION_ENCODER:
                parts.append(quantize_int8_static(part, fp32[part], out, pixel_reader(calib), r,
                                                  options.calibration_method, **int8_form))
            elif part == Part.CONNECTOR:
                enc = lambda px: ref.vision_encoder.run(["image_features"], {"pixel_values": px})[0]  # noqa: E731
                parts.append(quantize_int8_static(part, fp32[part], out, feature_reader(enc, calib), r,
                                                  options.calibration_method, **int8_form))
            else:
                reader = None
                if options.algorithm == "gptq" and precision == "int4":  # an int8 build has no int4 node
                    emb = load_file(str(fp32[Part.TOKEN_EMBEDDING]))["weight"].astype(np.float32)
                    reader = decoder_feeds(calib, emb, ref.encode_images, facts)
                parts.append(quantize_weight_only(part, fp32[part], out, precision, r, options.algorithm,
                                                  options.block_size, options.accuracy_level, reader))
    scores: dict = {}
    items = gate_items(preprocess.image_size, options.eval_per_category)
    ref_pipe = prompt_pipeline(tokenizer_path, template, preprocess, model, ref)
    ref_task = None  # fp32's task scores, once for every precision
    if options.accuracy:
        progress(f"score fp32 ({len(items)} test prompts)")
        ref_task = task_scores(ref_pipe, items)
    built = {part: {"fp32": path} for part, path in fp32.items()}
    for q in parts:
        built[q.part][q.precision] = q.path
    for precision in precisions:
        progress(f"score {precision} against fp32 ({len(items)} test prompts)")
        # the combination the runtime loads for this precision (bundle.PART_PRECISION_FALLBACK):
        # int4 scores the int4 decoder with the int8 vision parts when those were built too
        chosen = {part: part_precision(have, precision) for part, have in built.items()}
        files = {part: built[part][p] for part, p in chosen.items()}
        q_pipe = prompt_pipeline(tokenizer_path, template, preprocess, model, ort_session(files, model))
        s = score(ref_pipe, q_pipe, items, accuracy=options.accuracy, reference=ref_task)
        s["parts"] = {q.part: {"precision": q.precision, "quantized_nodes": len(q.quantized_nodes),
                               "kept_nodes": list(q.kept_nodes), **q.settings}
                      for q in parts if chosen[q.part] == q.precision}
        scores[precision] = check_gates(s, precision, options.gates.get(precision), options.allow_degraded)
        if not options.cpu_prefill_gate:
            continue
        progress(f"score {precision} with the int8-GEMM cpu prefill against fp32")
        cpu = score_cpu_prefill(ref_pipe, files, items, precision, tokenizer_path=tokenizer_path, template=template,
                                preprocess=preprocess, model=model, options=options, reference=ref_task)
        if cpu is not None:
            scores[precision]["cpu_prefill_int8"] = cpu
    return QuantResult(parts, scores, {**calib.summary(), "recipe": recipe.to_dict()})




def model_size(path: str | os.PathLike) -> int:
    from ..quant.quantize import model_bytes

    return model_bytes(Path(path))
