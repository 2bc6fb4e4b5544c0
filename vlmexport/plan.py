"""``vlmexport plan``: does a bundle fit a device, at which precision and context, and how fast will it decode.

For every runnable artifact set of the bundle (ONNX at each precision, GGUF at each quant
type) the peak memory is predicted as

    runtime overhead + weight files x resident bytes per file byte + KV cache at the context
    + activations at the longest prompt

- KV cache: layers x 2 x kv_heads x head_dim x context x bytes per element (the decoder's KV
  dtype for onnxruntime; f16 for llama.cpp, its default). Both backends allocate it for the
  whole context when the model loads.
- activations: the prefill of the longest prompt (the context) through the decoder, with
  the attention scores of every head materialised (their causal lower triangle: the pages
  written), or the vision encoder on the images that fit, whichever is larger (llama.cpp
  prefills in micro-batches of at most 512 tokens).
- runtime overhead and resident bytes per file byte: *measured* on a CPU with
  ``benchmarks/plan_check.py`` (see :data:`MEASURED`). A GPU adds its CUDA context, an estimate
  from published figures (not measured here), see :data:`CUDA_CONTEXT_GB`.

A device fits when the prediction stays under its memory minus the margin its OS needs.
Decode speed is the bandwidth roofline: the bytes one token reads (the language path of
the decoder weights, the LM head, the KV cache at the context) over the memory bandwidth;
real decoders reach 40-80% of it.

Only numbers from the manifest are used; no architecture name appears here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .bundle import PART_PRECISION_FALLBACK, Bundle, part_precision
from .core.errors import VlmexportError
from .core.names import DECODE_GRAPH_PRECISIONS

GB = 1e9


class PlanError(VlmexportError):
    """The device or context asked for is unknown or out of range."""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    label: str
    memory_gb: float  # the memory the model runs from (unified on Jetson, device memory on a GPU, RAM on a CPU)
    bandwidth_gbs: float  # peak DRAM bandwidth
    compute_capability: str | None  # None: no NVIDIA GPU
    unified: bool  # CPU and GPU share the memory (Jetson): the OS margin comes out of the same pool
    os_margin_gb: float  # what the OS, the display and the container runtime keep
    backends: tuple[str, ...]
    note: str = ""

    @property
    def gpu(self) -> bool:
        return self.compute_capability is not None


_GPU = ("tensorrt", "onnxruntime", "llamacpp", "torch")
# Published figures (NVIDIA data sheets): memory, bandwidth, compute capability. OS margins: an
# Orin Nano with the desktop uses ~1.5 GB of its 8; headless L4T ~0.8 GB; a discrete GPU keeps
# ~0.5 GB for the driver / display.
DEVICES: dict[str, DeviceSpec] = {d.name: d for d in (
    DeviceSpec("orin-nano-8gb", "Jetson Orin Nano 8 GB", 8.0, 68.0, "8.7", True, 1.5, _GPU,
               "102 GB/s in the JetPack 6.2 'Super' power mode"),
    DeviceSpec("orin-nx-16gb", "Jetson Orin NX 16 GB", 16.0, 102.4, "8.7", True, 2.0, _GPU),
    DeviceSpec("agx-orin-32gb", "Jetson AGX Orin 32 GB", 32.0, 204.8, "8.7", True, 2.0, _GPU),
    DeviceSpec("agx-orin-64gb", "Jetson AGX Orin 64 GB", 64.0, 204.8, "8.7", True, 2.0, _GPU),
    DeviceSpec("thor", "Jetson AGX Thor (T5000) 128 GB", 128.0, 273.0, "11.0", True, 3.0, _GPU,
               "JetPack 7, CUDA 13"),
    DeviceSpec("rtx-4090", "GeForce RTX 4090 24 GB", 24.0, 1008.0, "8.9", False, 0.5, _GPU),
    DeviceSpec("l4", "NVIDIA L4 24 GB", 24.0, 300.0, "8.9", False, 0.5, _GPU),
    DeviceSpec("h100", "NVIDIA H100 SXM 80 GB", 80.0, 3350.0, "9.0", False, 0.5, _GPU),
)}

# Measured here with benchmarks/plan_check.py (2-vCPU x86 VM, onnxruntime 1.32, llama-cpp-python
# 0.3.36; the demo, bench-s and `mid` bundles, three requests each so that the peak is the steady
# state; the `wide` bundle held out; docs/deployment.md has the table):
# - base_mb: RSS of a process that imported the backend and read the tokenizer, before any weights;
# - fixed_mb: what loading costs besides the weights and the KV cache (sessions, graphs, llama.cpp's
#   compute buffers): the intercept of the fp32 loads of two model sizes;
# - per_byte: resident bytes per byte of weight files once loaded (onnxruntime on a CPU turns fp16
#   weights into fp32; llama.cpp repacks f16 / q8_0 for its CPU kernels). A precision not measured
#   falls back to 1.0 and its estimate says so (measured=False).
# - activations: the steady-state peak above the loaded weights and KV against the two formulas of
#   activation_terms (onnxruntime: fixed MB + scales of the decoder and vision terms, least squares;
#   llama.cpp: one scale of the larger term).
MEASURED: dict[str, dict[str, Any]] = {
    "onnxruntime": {"base_mb": 68.8, "fixed_mb": 17.8,
                    "per_byte": {"fp16": 2.054, "fp32": 0.94, "int4": 1.096, "int8": 1.148},
                    "activations": {"fixed_mb": 10.4, "decoder": 1.37, "vision": 2.62}},
    "llamacpp": {"base_mb": 58.4, "fixed_mb": 15.9,
                 "per_byte": {"f16": 1.727, "f32": 1.005, "q4_k_m": 1.032, "q8_0": 1.015},
                 "activations": {"decoder": 1.12, "vision": 1.12}},
}
# CUDA context + cuBLAS/cuDNN handles per process: published / commonly reported figures, not
# measured on these machines (no GPU here).
CUDA_CONTEXT_GB = {"unified": 0.8, "discrete": 0.5}
QUALITY = ("fp32", "f32", "bf16", "fp16", "f16", "int8", "q8_0", "q4_k_m", "int4", "q4_0")
WEIGHT_BYTES = {"fp32": 4.0, "f32": 4.0, "fp16": 2.0, "f16": 2.0, "bf16": 2.0, "int8": 1.0, "q8_0": 1.0625,
                "int4": 0.5625, "q4_k_m": 0.5625, "q4_0": 0.5625}
LLAMA_UBATCH = 512


@dataclass(frozen=True)
class ArtifactSet:
    backend: str  # onnxruntime | llamacpp
    precision: str
    files_bytes: int  # every file the backend loads
    decoder_bytes: int  # the text decoder's files
    kv_bytes_per_element: int


@dataclass
class Estimate:
    backend: str
    precision: str
    context: int
    weights_gb: float
    kv_cache_gb: float
    activations_gb: float
    overhead_gb: float
    peak_gb: float
    budget_gb: float
    fits: bool
    max_context: int  # largest context (<= the model's) that fits; 0: none
    decode_tok_s: float  # bandwidth roofline at the context
    measured: bool = True  # False: this backend x precision's load factor was not measured (1.0 assumed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    bundle: str
    device: DeviceSpec
    context: int
    model_context: int
    images: int
    estimates: list[Estimate] = field(default_factory=list)

    def best(self, backend: str | None = None) -> Estimate | None:
        """The highest-quality precision that fits (for one backend, or any)."""
        fitting = [e for e in self.estimates if e.fits and (backend is None or e.backend == backend)]
        return min(fitting, key=lambda e: (_quality(e.precision), e.peak_gb), default=None)

    def to_dict(self) -> dict[str, Any]:
        best = {b: (e.precision if (e := self.best(b)) else None) for b in sorted({x.backend for x in self.estimates})}
        return {"bundle": self.bundle, "device": asdict(self.device), "context": self.context,
                "model_context": self.model_context, "images": self.images,
                "estimates": [e.to_dict() for e in self.estimates], "best_precision": best}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _quality(precision: str) -> int:
    return QUALITY.index(precision) if precision in QUALITY else len(QUALITY)


# ------------------------------------------------------------------ devices
def device(name: str, bandwidth_gbs: float | None = None) -> DeviceSpec:
    if name == "host":
        return host_device(bandwidth_gbs)
    if name not in DEVICES:
        raise PlanError(f"unknown device {name!r}; choose one of {', '.join([*DEVICES, 'host'])}")
    d = DEVICES[name]
    return replace(d, bandwidth_gbs=bandwidth_gbs) if bandwidth_gbs else d


def host_device(bandwidth_gbs: float | None = None) -> DeviceSpec:
    """This machine: RAM from /proc/meminfo, bandwidth measured (or given), the backends installed."""
    import importlib.util

    total = _meminfo_gb("MemTotal") or 0.0
    backends = tuple(b for b, mod in (("onnxruntime", "onnxruntime"), ("llamacpp", "llama_cpp"), ("torch", "torch"),
                                      ("tensorrt", "tensorrt")) if importlib.util.find_spec(mod) is not None)
    bw = bandwidth_gbs or measure_bandwidth_gbs()
    margin = max(1.0, 0.1 * total)
    return DeviceSpec("host", f"this machine ({os.cpu_count()} CPUs)", round(total, 2), round(bw, 1), None, False,
                      round(margin, 2), backends, "bandwidth measured with numpy reads")


def _meminfo_gb(key: str) -> float | None:
    from .runtimes.environment import meminfo_bytes

    b = meminfo_bytes(key)
    return None if b is None else b / GB


def measure_bandwidth_gbs(mib: int = 512, repeats: int = 3) -> float:
    """Memory read bandwidth: one numpy reduction per core over one array (best of ``repeats``)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    a = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / GB


# ---------------------------------------------------------------- artifacts
def artifact_sets(bundle: Bundle, int8_prefill: bool = False) -> list[ArtifactSet]:
    """What each backend would load, per precision, as the runtime's loader picks the files.
    ``int8_prefill``: on a CPU where ``vlmexport.load`` runs the prompt through the int8-GEMM copy
    of a quantized decoder (runtimes/cpu_prefill.py), that copy's weights are counted too, in place
    of the decoder's where a decode graph runs the decode steps."""
    out: list[ArtifactSet] = []
    parts = ("vision_encoder", "connector", "text_decoder", "token_embedding")
    for precision in bundle.precisions("text_decoder", "onnx"):
        files = decoder = 0
        for part in parts:
            chosen = part_precision(bundle.precisions(part, "onnx"), precision) \
                if precision in PART_PRECISION_FALLBACK else precision
            if chosen is None or chosen not in bundle.precisions(part, "onnx"):
                break
            a = bundle.find(part, "onnx", chosen)
            files += a.total_size_bytes
            if part == "text_decoder":
                decoder += a.total_size_bytes
                files += _decode_graph_weight_bytes(a)  # its session's own copy of the language weights
                copy = _int8_prefill_bytes(a) if int8_prefill else 0
                # the copy runs the prompt; the decode steps run the decode graph where there is one,
                # else the decoder's own graph, which then stays loaded too
                files += copy - (a.total_size_bytes if copy and (a.extra or {}).get("decode_graph") else 0)
        else:
            kv = _onnx_kv_bytes(bundle, precision)
            out.append(ArtifactSet("onnxruntime", precision, files, decoder, kv))
    for precision in bundle.precisions("text_decoder", "gguf"):
        text = bundle.find("text_decoder", "gguf", precision).total_size_bytes
        try:
            proj = bundle.find("mmproj", "gguf", precision).total_size_bytes
        except VlmexportError:
            continue
        out.append(ArtifactSet("llamacpp", precision, text + proj, text, 2))
    if not out:
        raise PlanError(f"{bundle.root}: has no ONNX or GGUF artifacts to plan for; build it with "
                        "`vlmexport build --format onnx,gguf`")
    return out


def _decode_graph_weight_bytes(decoder) -> int:
    """Weight bytes the onnxruntime backend's decode-graph session loads besides the decoder's
    (a quantized decoder's routing-free graph, DECODE_GRAPH_PRECISIONS); 0 where it runs none."""
    if decoder.precision not in DECODE_GRAPH_PRECISIONS:
        return 0
    return int((decoder.extra or {}).get("decode_graph_weight_bytes", 0))  # recorded by the build


def _int8_prefill_bytes(decoder) -> int:
    """Bytes of the int8-GEMM prefill copy the loader uses instead of the decoder's graph on a CPU
    without VNNI (recorded by the build's gate when the copy passed it); 0 where it is not used."""
    from .runtimes.cpu_prefill import gate_passed, gate_record

    return int(gate_record(decoder).get("weight_bytes", 0)) if gate_passed(decoder) else 0


def _onnx_kv_bytes(bundle: Bundle, precision: str) -> int:
    art = bundle.find("text_decoder", "onnx", part_precision(bundle.precisions("text_decoder", "onnx"), precision)
                      if precision in PART_PRECISION_FALLBACK else precision)
    for spec in art.inputs:
        if spec.name.startswith("past_key_values"):
            return 2 if spec.dtype in ("float16", "bfloat16") else 4
    return 4


# ------------------------------------------------------------------ memory
@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_length: int
    image_tokens: int
    has_experts: bool
    vision_tokens: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> "ModelShape":
        hf = m.get("hf_config") or {}
        vc = hf.get("vision_config") or m.get("vision_config") or {}
        img, patch = vc.get("image_size", m.get("image_size", 224)), vc.get("patch_size", 14)
        hidden = m["hidden_size"]
        return cls(num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"], num_heads=m.get("num_heads", 1),
                   head_dim=m["head_dim"], hidden_size=hidden,
                   intermediate_size=m.get("intermediate_size", 4 * hidden), vocab_size=m["vocab_size"],
                   max_length=m["max_length"], image_tokens=m["image_tokens"], has_experts=bool(m.get("has_experts")),
                   vision_tokens=(img // patch) ** 2 + 1, vision_hidden=vc.get("hidden_size", hidden),
                   vision_intermediate=vc.get("intermediate_size", 4 * vc.get("hidden_size", hidden)),
                   vision_heads=vc.get("num_heads", 1))


def kv_cache_bytes(s: ModelShape, context: int, bytes_per_element: int) -> int:
    """layers x 2 (K and V) x kv_heads x head_dim x context x bytes."""
    return s.num_layers * 2 * s.num_kv_heads * s.head_dim * context * bytes_per_element


def activation_terms(s: ModelShape, prompt: int, images: int, backend: str) -> tuple[int, int]:
    """(decoder, vision) working-memory formulas of a request, fp32 bytes, before the measured terms.

    decoder: the prefill of ``prompt`` positions (llama.cpp: in micro-batches of 512): hidden
    states and the causal lower triangle of every head's score matrix (the pages a causal
    prefill writes). vision: the encoder on ``images`` images, full score matrices."""
    seq = min(prompt, LLAMA_UBATCH) if backend == "llamacpp" else prompt
    hidden_states = seq * (6 * s.hidden_size + 3 * s.intermediate_size) * 4
    scores = s.num_heads * seq * min(prompt, s.max_length) * 4 // 2
    logits = s.vocab_size * 4
    vision = images * s.vision_tokens * (6 * s.vision_hidden + 2 * s.vision_intermediate) * 4 \
        + images * s.vision_heads * s.vision_tokens ** 2 * 4
    return hidden_states + scores + logits, vision


def activation_bytes(s: ModelShape, prompt: int, images: int, backend: str,
                     measured: dict[str, dict[str, Any]] | None = None) -> float:
    """Working memory of a request above the loaded weights and KV cache, with the backend's
    measured terms (``MEASURED[backend]["activations"]``: fixed MB, decoder and vision scales).

    llama.cpp reuses one compute buffer: the larger of the two. onnxruntime runs each part as
    its own session with its own arena: the decoder's first arena region (sized by the first
    long prefill) stays resident and the next request's image encode comes on top of it, so
    the two add up (measured: docs/deployment.md)."""
    t = (measured or MEASURED).get(backend, {}).get("activations", {})
    decoder, vision = activation_terms(s, prompt, images, backend)
    decoder, vision = decoder * t.get("decoder", 1.0), vision * t.get("vision", 1.0)
    fixed = t.get("fixed_mb", 0.0) * (1 << 20)
    return fixed + (decoder + vision if backend == "onnxruntime" else max(decoder, vision))


def decode_bytes_per_token(s: ModelShape, a: ArtifactSet, context: int) -> float:
    """Bytes one decode step reads: the decoder's language path, the LM head, the KV cache."""
    bpw = WEIGHT_BYTES.get(a.precision, 4.0)
    table = s.vocab_size * s.hidden_size * bpw
    embedding_in_file = table if a.backend == "llamacpp" else 0.0  # the GGUF holds the input embedding table
    layers = max(0.0, a.decoder_bytes - embedding_in_file - table)
    if s.has_experts:
        layers /= 2  # a text token runs the language expert only
    return layers + table + kv_cache_bytes(s, context, a.kv_bytes_per_element)


def estimate(s: ModelShape, a: ArtifactSet, dev: DeviceSpec, context: int, images: int,
             measured: dict[str, dict[str, Any]] | None = None) -> Estimate:
    meas = (measured or MEASURED).get(a.backend, {})
    # the factors were measured on a CPU (where onnxruntime widens fp16 to fp32); on a GPU the
    # weights stay as stored: 1.0, flagged as not measured
    per_byte = None if dev.gpu else meas.get("per_byte", {}).get(a.precision)
    host_mb = meas.get("base_mb", 0.0) + meas.get("fixed_mb", 0.0)
    # a discrete GPU's memory holds no interpreter; a Jetson's unified memory holds both
    overhead = 0.0 if dev.gpu and not dev.unified else host_mb * (1 << 20)
    if dev.gpu:
        overhead += CUDA_CONTEXT_GB["unified" if dev.unified else "discrete"] * GB
    budget = dev.memory_gb - dev.os_margin_gb
    weights = a.files_bytes * (per_byte if per_byte is not None else 1.0)

    def peak(ctx: int) -> tuple[float, float, float]:
        kv = kv_cache_bytes(s, ctx, a.kv_bytes_per_element)
        act = activation_bytes(s, ctx, images, a.backend, measured)
        return kv, act, weights + kv + act + overhead

    kv, act, total = peak(context)
    lo, hi = 0, s.max_length  # the largest context that fits (peak grows with the context)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak(mid)[2] <= budget * GB:
            lo = mid
        else:
            hi = mid - 1
    tok_s = dev.bandwidth_gbs * GB / decode_bytes_per_token(s, a, context)
    return Estimate(a.backend, a.precision, context, weights / GB, kv / GB, act / GB, overhead / GB, total / GB,
                    budget, total <= budget * GB, lo, tok_s, per_byte is not None)


def plan(bundle_path: str | os.PathLike, device_name: str, context: int | None = None, images: int | None = None,
         bandwidth_gbs: float | None = None) -> Plan:
    """Predict memory and decode speed of every artifact set of a bundle on a device."""
    b = Bundle.open(bundle_path, verify="size")
    s = ModelShape.from_manifest(b.section("model"))
    ctx = s.max_length if context is None else context
    if not 1 <= ctx <= s.max_length:
        raise PlanError(f"--context {ctx}: give 1..{s.max_length} (the model's context)")
    n_img = max(1, min(ctx // max(1, s.image_tokens), 8)) if images is None else images
    dev = device(device_name, bandwidth_gbs)
    from .runtimes.cpu_prefill import lacks_int8_dot

    sets = [a for a in artifact_sets(b, int8_prefill=device_name == "host" and lacks_int8_dot())
            if a.backend in dev.backends]
    if not sets:
        raise PlanError(f"{device_name}: none of this bundle's formats runs there (backends "
                        f"{list(dev.backends)}); install onnxruntime or llama-cpp-python")
    p = Plan(str(b.root), dev, ctx, s.max_length, n_img)
    p.estimates = sorted((estimate(s, a, dev, ctx, n_img) for a in sets),
                         key=lambda e: (e.backend, _quality(e.precision)))
    return p

