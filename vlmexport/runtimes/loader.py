"""``vlmexport.load(bundle, backend=..., precision=..., device=...)`` -> :class:`Pipeline`.

The loader reads only the bundle (manifest, tokenizer, preprocessing, template) and
hands the backend the files of the artifacts it runs. Backends are looked up in
``BACKENDS``; nothing here names an architecture.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable

from ..bundle import PART_PRECISION_FALLBACK, Bundle, BundleError, part_precision
from ..bundle.schema import check_memory, validate_runtime
from ..core.errors import MissingDependencyError, VlmexportError
from ..core.names import DECODE_GRAPH_PRECISIONS, Backend, CpuPrefill, Device, Part, Spin
from ..core.preprocess import PreprocessConfig
from ..core.prompt import ChatTemplate
from ..core.tokenizer import Tokenizer
from .pipeline import Pipeline
from .spec import decoder_shape, model_spec


def _pick_precision(bundle: Bundle, part: str, fmt: str, precision: str | None, device: str) -> str:
    available = bundle.precisions(part, fmt)
    if not available:
        raise BundleError(f"{bundle.root}: has no {fmt} {part}; rebuild it with `vlmexport build --format {fmt}`")
    if precision is not None:
        if precision not in available:
            raise BundleError(f"{bundle.root}: has no {precision} {fmt} {part} (it has {available}); pick one of "
                              f"those or rebuild with `--precision {precision}`")
        return precision
    preference = ("fp16", "fp32") if device == "cuda" else ("fp32", "fp16")
    for p in preference:
        if p in available:
            return p
    return available[0]


QUANTIZED = tuple(PART_PRECISION_FALLBACK)  # per part: see bundle.PART_PRECISION_FALLBACK


def _part_precision(bundle: Bundle, part: str, precision: str) -> str:
    """The precision ``part`` runs in when ``precision`` (a quantized one) was asked for."""
    available = bundle.precisions(part, "onnx")
    chosen = part_precision(available, precision)
    if chosen is None:
        raise BundleError(f"{bundle.root}: has neither a {precision} nor an fp32 onnx {part} (it has {available}); "
                          f"rebuild with `--precision fp32,{precision}`")
    return chosen


def _onnxruntime(bundle: Bundle, precision: str | None, device: str, threads: int | None, spin="decode",
                 cpu_prefill="auto"):
    if importlib.util.find_spec("onnxruntime") is None:
        raise MissingDependencyError("onnxruntime is not installed; install it with `pip install 'vlmexport[onnx]'`")
    from .onnxruntime_backend import OrtModelSession, default_providers

    m = bundle.section("model")
    if precision in QUANTIZED:
        parts = (Part.VISION_ENCODER, Part.CONNECTOR, Part.TEXT_DECODER, Part.TOKEN_EMBEDDING)
        if not any(precision in bundle.precisions(part, "onnx") for part in parts):
            raise BundleError(f"{bundle.root}: has no {precision} onnx part; rebuild it with "
                              f"`vlmexport build --format onnx --precision fp32,{precision}`")
        per_part = {part: _part_precision(bundle, part, precision) for part in parts}
        p = precision
    else:
        p = _pick_precision(bundle, Part.TEXT_DECODER, "onnx", precision, device)
        per_part = {}
    providers = default_providers()
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise MissingDependencyError("device='cuda' needs onnxruntime-gpu (the CUDA execution provider); install "
                                     "onnxruntime-gpu or use device='cpu'")
    facts = decoder_shape(m)
    f = lambda part: bundle.file(bundle.find(part, "onnx", per_part.get(part, p)).file)  # noqa: E731
    decoder = bundle.find(Part.TEXT_DECODER, "onnx", per_part.get(Part.TEXT_DECODER, p))
    decode_graph = (decoder.extra or {}).get("decode_graph") if decoder.precision in DECODE_GRAPH_PRECISIONS else None
    session = OrtModelSession(f(Part.TEXT_DECODER), f(Part.TOKEN_EMBEDDING), facts,
                              decode_path=bundle.file(decode_graph) if decode_graph else None,
                              vision_encoder_path=f(Part.VISION_ENCODER), connector_path=f(Part.CONNECTOR),
                              providers=providers, intra_op_num_threads=threads, allow_spinning=spin,
                              cpu_prefill=_cpu_prefill(decoder, cpu_prefill),
                              cpu_prefill_identity=" ".join([decoder.sha256, *(d["sha256"] for d in decoder.data_files)]))
    return session, f"onnxruntime-{p}"


def _cpu_prefill(decoder, mode) -> CpuPrefill:
    """"auto" only for a decoder whose build scored this version's int8-GEMM prefill and passed the
    gate with it (pipeline/quantize.py): an older bundle, or one whose copy failed, keeps its own graph."""
    from .cpu_prefill import gate_passed

    mode = CpuPrefill.of(mode)
    return CpuPrefill.OFF if mode is CpuPrefill.AUTO and not gate_passed(decoder) else mode


def _torch(bundle: Bundle, precision: str | None, device: str, threads: int | None, spin="decode"):
    if importlib.util.find_spec("torch") is None:
        raise MissingDependencyError("the torch backend needs PyTorch; install it with `pip install 'vlmexport[torch]'`")
    import torch

    from ..models.checkpoint import load_pretrained
    from .torch_session import TorchSession

    try:
        art = bundle.find("model", "torch")
    except BundleError:
        raise BundleError(f"{bundle.root}: holds no PyTorch reference weights; rebuild without --no-reference to use "
                          "the torch backend") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError("device='cuda' needs a CUDA build of PyTorch and a visible GPU "
                                     "(torch.cuda.is_available() is False here); install torch for CUDA or use "
                                     "device='cpu'")
    if threads:
        torch.set_num_threads(threads)
    dtypes = {"fp32": torch.float32, "reference": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision is not None and precision not in dtypes:
        raise VlmexportError(f"the torch backend runs {sorted(dtypes)}, not precision {precision!r}; pick one of "
                             "those or another backend")
    # on CUDA: fp16 by default (as the ONNX and TensorRT profiles), static KV cache, decode as a CUDA graph
    dtype = dtypes.get(precision or ("fp16" if device == "cuda" else "fp32"))
    loaded = load_pretrained(bundle.file(art.file).parent, dtype=dtype, device=device)
    session = TorchSession(loaded.model)
    graphs = "-cudagraph" if session.cuda_graphs else ""
    return session, f"torch-{str(dtype).replace('torch.', '')}{graphs}"


def _llamacpp(bundle: Bundle, precision: str | None, device: str, threads: int | None, spin="decode"):
    from .llamacpp_backend import LlamaCppSession, llamacpp_available

    if not llamacpp_available():
        raise MissingDependencyError("the llamacpp backend needs llama-cpp-python; install it with "
                                     "`pip install 'vlmexport[llamacpp]'`")
    m = bundle.section("model")
    available = bundle.precisions(Part.TEXT_DECODER, "gguf")
    if not available:
        raise BundleError(f"{bundle.root}: has no GGUF files; rebuild it with `vlmexport build --format gguf`")
    if precision is None:
        precision = next((p for p in ("f32", "f16", "q8_0", "q4_k_m") if p in available), available[0])
    elif precision not in available:
        raise BundleError(f"{bundle.root}: has no {precision} GGUF (it has {available}); pick one of those or "
                          f"rebuild with `--format gguf --precision {precision}`")
    for d in bundle.semantics_deviations:  # recorded by the build, measured against PyTorch
        if (d.get("format") if isinstance(d, dict) else str(d).split(":")[0]) == "gguf":
            what = "; ".join(d.get("what", [])) if isinstance(d, dict) else str(d)
            summary = d.get("summary", "") if isinstance(d, dict) else ""
            logging.getLogger(__name__).warning("this bundle's GGUF does not run the model as it is: %s. %s",
                                                what, summary)
    text = bundle.file(bundle.find(Part.TEXT_DECODER, "gguf", precision).file)
    mmproj = bundle.file(bundle.find(Part.MMPROJ, "gguf", precision).file)
    session = LlamaCppSession(text, mmproj, n_ctx=m["max_length"], n_threads=threads,
                              n_gpu_layers=-1 if device == "cuda" else 0, expected_arch=m["gguf_arch"])
    return session, f"llamacpp-{precision}"


def _tensorrt(bundle: Bundle, precision: str | None, device: str, threads: int | None, spin="decode"):
    from .tensorrt_backend import load_tensorrt

    return load_tensorrt(bundle, precision, device, threads, spin is Spin.ALL)


BACKENDS: dict[Backend, Callable] = {Backend.ONNXRUNTIME: _onnxruntime, Backend.TORCH: _torch,
                                     Backend.LLAMACPP: _llamacpp, Backend.TENSORRT: _tensorrt}


def load(bundle: str | os.PathLike, backend: str = "auto", precision: str | None = None, device: str | None = None,
         threads: int | None = None, verify: str = "full", spin: bool | str = "decode",
         cpu_prefill: str = "auto") -> Pipeline:
    """Open a bundle and return a pipeline (``generate``, ``stream``, ``chat``) on one backend.

    ``spin`` ("decode", "all", "off"; True means "all", False "off") lets onnxruntime's worker
    threads busy-wait between operators while a decoder graph runs ("decode", the default) or
    while any part runs ("all"); they stop when the run returns. On a machine the model has to
    itself that is +20% decode (bench-s int4, 2 vCPUs); with another process busy on the cores,
    -24% (OrtModelSession has the figures). Several model copies sharing the cores
    (``vlmexport serve --max-concurrency``) should pass "off".

    ``cpu_prefill`` (onnxruntime on a CPU, int4/int8 decoders): "auto" (the default) runs the prompt
    through an int8-GEMM copy of the decoder graph on x86 CPUs without VNNI, where it is ~1.5x
    faster, when the bundle's gate scored that copy; "int8" on any CPU; "off" never
    (runtimes/cpu_prefill.py).
    """
    try:
        choice = Backend(backend)
    except ValueError:
        raise VlmexportError(f"unknown backend {backend!r}; choose one of {[b.value for b in Backend]}") from None
    spin = Spin.of(spin)
    cpu_prefill = CpuPrefill.of(cpu_prefill)
    device = device or "cpu"
    if device not in tuple(Device):
        raise VlmexportError(f"unknown device {device!r}; use one of {', '.join(d.value for d in Device)}")
    device = Device(device).value
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise VlmexportError(f"threads={threads!r}: give a positive number of threads, or None for the default")
    if precision is not None and not isinstance(precision, str):
        raise VlmexportError(f"precision={precision!r}: give a precision name such as 'fp32', or None")
    b = Bundle.open(bundle, verify=verify)
    # every number below sizes a buffer: typed, bounded and checked against the files first
    runtime = validate_runtime(b.manifest, b.artifacts, str(b.root / "manifest.json"))
    check_memory(runtime.model, source=str(b.root))
    if choice is Backend.AUTO:
        formats = {a.format for a in b.artifacts}
        if "onnx" in formats and importlib.util.find_spec("onnxruntime") is not None:
            choice = Backend.ONNXRUNTIME
        elif "torch" in formats:
            choice = Backend.TORCH
        elif "tensorrt" in formats and importlib.util.find_spec("onnxruntime") is not None:
            choice = Backend.TENSORRT  # engines on cuda; on cpu the profile on onnxruntime
        else:
            raise BundleError(f"{b.root}: no artifact this installation can run (formats {sorted(formats)}); "
                              "install `vlmexport[onnx]`")
    extra = {"cpu_prefill": cpu_prefill} if choice is Backend.ONNXRUNTIME else {}
    session, name = BACKENDS[choice](b, precision, device, threads, spin, **extra)
    tok = Tokenizer(b.file(b.section("tokenizer")["file"]))
    pre = PreprocessConfig.load(b.file(b.section("preprocessing")["file"]))
    if pre.image_size != runtime.preprocessing.image_size:  # the file must say what the validated manifest says
        raise BundleError(f"{b.root}: {runtime.preprocessing.file} says image size {pre.image_size} but the manifest "
                          f"says {runtime.preprocessing.image_size}; rebuild the bundle with `vlmexport build`")
    template = ChatTemplate.from_dict(b.section("chat_template"), read=lambda f: b.file(f).read_text())
    return Pipeline(session, tok, template, pre, model_spec(b.section("model")), backend=name)

