"""Quantized GGUF files, text GGUF and mmproj, through llama.cpp's own quantizer.

Text GGUF (q8_0, q4_k_m, q4_0)
    ``llama_model_quantize`` through llama-cpp-python's ctypes API, on the f16 text GGUF of
    our writer. In the llama.cpp vendored by llama-cpp-python 0.3.36, the quantize
    parameters are plain C structs (include/llama.h): ``imatrix`` is a NULL-name-terminated
    array of ``llama_model_imatrix_data {const char *name; const float *data; size_t size}``
    and ``tt_overrides`` a NULL-pattern-terminated array of ``llama_model_tensor_override
    {const char *pattern; enum ggml_type type}`` (src/llama-quant.cpp copies both before it
    starts), and llama-cpp-python exposes both structs. So the importance matrix and the
    per-tensor type overrides go through the Python API and no ``llama-quantize`` binary
    is built. (Older llama.cpp took C++ ``std::unordered_map`` / ``std::vector`` pointers
    there (``void *``), which Python cannot build; with such a version ``llama-quantize
    --imatrix FILE --tensor-type REGEX=TYPE`` is the route: scripts/llama_quantize.sh builds it
    and :func:`vlmexport.quant.imatrix.write_imatrix` writes the file it reads.) The quantizer is handed the *mean* squared activation per
    column, which is what ``llama-quantize`` derives from a file (in_sum2 / counts).

Visual experts get the language experts' types
    llama.cpp chooses a tensor's type by name (``tensor_get_category`` in
    src/llama-quant.cpp): ``blk.N.vis_attn_qkv.weight`` and ``blk.N.vis_attn_output.weight``
    contain ``attn_qkv.weight`` / ``attn_output.weight`` and so are categorised like the
    language tensors, but ``vis_gate`` / ``vis_up`` / ``vis_down`` contain no ``ffn_`` and fall
    into OTHER: under q4_k_m ``vis_down`` misses the Q6_K bump ``ffn_down`` gets in the
    ``use_more_bits`` layers (and under q4_0 with an imatrix the Q4_1 of the first layers).
    The fused QKV bump counts ``attn_qkv`` and ``vis_attn_qkv`` together (one counter over
    2 x n_layer tensors), so the two experts' QKV of one layer can also differ. Rather than
    re-implementing those rules, llama.cpp is asked for its plan first: a ``dry_run``
    quantize (same ftype, same imatrix) reads only the metadata and logs the type it would
    give every tensor. If any visual-expert type differs from its twin's, the one real pass
    pins every expert tensor (both experts) to the language tensor's planned type through
    ``tt_overrides`` (pinning both keeps llama.cpp's running counters out of it). The
    result: ``vis_X`` of layer N has exactly the type of its language twin, for the cost of
    one quantization (an earlier version quantized, read the types back and quantized
    again, which doubled the time on a 17B checkpoint).

mmproj (q8_0)
    The same ``llama_model_quantize``: this llama.cpp registers a dummy ``clip``
    architecture "only used by llama-quantize" (src/llama-arch.cpp, LLM_ARCH_CLIP) and
    quantizes an mmproj GGUF without building a model; libmtmd loads the result. Rows
    that are not whole blocks (e.g. a 48-wide ViT) fall back to F16, the patch
    convolution stays F16 and norms / biases / position embeddings stay F32.
    ``tests/quant/test_gguf_quant.py`` checks the types and that libmtmd's image
    embeddings stay within 3e-2 of PyTorch's. Every quantized text GGUF is paired with
    the q8_0 mmproj (:data:`MMPROJ_FOR`; a 4-bit ViT has not been measured).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..core.errors import ConfigError, require
from ..core.names import gguf_language_twin as language_twin  # noqa: F401  (re-exported)

gguf = require("gguf", "gguf")

log = logging.getLogger(__name__)

# our name -> llama_ftype constant of llama.h
QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
# the mmproj paired with each quantized text GGUF (our writer's outtypes)
MMPROJ_FOR = {"q8_0": "q8_0", "q4_k_m": "q8_0", "q4_0": "q8_0"}
_ALIASES = {"q4_k": "q4_k_m", "q4km": "q4_k_m", "q8": "q8_0", "q4": "q4_0"}

def normalize_quant_type(qtype: str) -> str:
    q = qtype.lower().replace("-", "_")
    q = _ALIASES.get(q, q)
    if q not in QUANT_TYPES:
        raise ConfigError(f"unknown GGUF quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    return q


def tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> ggml type name (``Q4_K``...) of a GGUF file."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    qtype: str
    types: dict[str, str]  # tensor -> ggml type
    imatrix: bool
    pinned: int  # tensors pinned to a language twin's planned type (0: llama.cpp's plan already matched)
    seconds: float
    mismatched_first_pass: tuple[str, ...] = field(default=())


def _lib():
    from ..runtimes.llamacpp_lib import LOG_SINK, init_backend

    lib, _ = init_backend()
    return lib, LOG_SINK


def _run_quantize(src: Path, dst: Path | None, qtype: str, imatrix: Mapping[str, np.ndarray] | None,
                  overrides: Mapping[str, str], nthread: int) -> dict[str, str] | None:
    """One ``llama_model_quantize`` call; ``dst=None`` is a dry run that returns llama.cpp's
    planned type per tensor (parsed from its per-tensor log lines) and writes nothing."""
    lib, sink = _lib()
    params = lib.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = getattr(lib, QUANT_TYPES[qtype])
    params.dry_run = dst is None
    keep: list = []  # everything the C side points at stays alive until the call returns
    if imatrix:
        arr = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(vals, dtype=np.float32)
            if not np.all(np.isfinite(buf)):
                raise ConfigError(f"the importance matrix of {name} holds non-finite values; recompute it")
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))
    if overrides:
        tt = (lib.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (name, tname) in enumerate(overrides.items()):
            tt[i].pattern = ("^" + re.escape(name) + "$").encode()
            tt[i].type = int(gguf.GGMLQuantizationType[tname])
        tt[len(overrides)].pattern = None
        keep.append(tt)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(lib.llama_model_tensor_override))
    tmp = dst.with_name(f".{dst.name}.partial") if dst is not None else src.with_name(f".{src.name}.dry-run")
    sink.take()
    with sink.capture() as lines:
        rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        why = sink.take() or "see llama.cpp's log"
        raise ConfigError(f"llama.cpp could not quantize {src.name} to {qtype} ({why})")
    if dst is None:
        return _planned_types(lines, src)
    os.replace(tmp, dst)
    return None


# "[  12/ 345] blk.0.ffn_down.weight - [  768,   256,     1,     1], type =    f16, size =  0.375 MiB -> 0.105 MiB (q4_K)"
# (no "(type)" at the end when the tensor keeps its type); src/llama-quant.cpp's dry-run lines
_PLAN_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(\w+),"
                        r"\s+size\s*=[^(]*(?:\((\w+)\))?\s*$")


def _planned_types(lines: list[str], src: Path) -> dict[str, str]:
    plan = {}
    for line in lines:
        m = _PLAN_LINE.search(line)
        if m:
            plan[m[1]] = (m[3] or m[2]).upper()
    n = len(gguf.GGUFReader(src).tensors)
    if len(plan) != n:  # a llama.cpp whose log format changed: better an error than silent mismatches
        raise ConfigError(f"could not read llama.cpp's quantization plan for {src.name} "
                          f"({len(plan)} of {n} tensors); this vlmexport expects llama-cpp-python 0.3.36's log lines")
    return plan


def quantize_text_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str,
                       imatrix: Mapping[str, np.ndarray] | None = None, nthread: int | None = None,
                       match_experts: bool = True) -> QuantizeResult:
    """Quantize a text GGUF (f16 or f32) with llama.cpp's quantizer.

    ``imatrix`` maps GGUF tensor names to mean squared input activations per column
    (:meth:`vlmexport.quant.imatrix.Imatrix.means`). With ``match_experts`` every
    visual-expert tensor ends up with its language twin's type (see the module docstring).
    """
    t0 = time.perf_counter()
    qtype = normalize_quant_type(qtype)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"{src}: no such GGUF file; export the f16 text GGUF first")
    if _architecture(src) == "clip":
        raise ConfigError(f"{src} is an mmproj; quantize it with quantize_mmproj_gguf")
    dst.parent.mkdir(parents=True, exist_ok=True)
    nthread = nthread or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    pins: dict[str, str] = {}
    mismatched: list[str] = []
    if match_experts:
        plan = _run_quantize(src, None, qtype, imatrix, {}, nthread)
        for name in plan:
            twin = language_twin(name)
            if twin is not None and twin in plan:
                pins[twin] = plan[twin]
                pins[name] = plan[twin]
                if plan[name] != plan[twin]:
                    mismatched.append(f"{name}:{plan[name]}!={plan[twin]}")
        if mismatched:
            log.info("gguf %s: llama.cpp plans %d visual-expert tensors with another type than their language "
                     "twin; pinning them", qtype, len(mismatched))
        else:
            pins = {}
    _run_quantize(src, dst, qtype, imatrix, pins, nthread)
    types = tensor_types(dst)
    return QuantizeResult(dst, qtype, types, bool(imatrix), len(pins), time.perf_counter() - t0, tuple(mismatched))


def expert_type_mismatches(types: Mapping[str, str]) -> list[str]:
    """Visual-expert tensors whose type differs from their language twin's (empty when all match)."""
    out = []
    for name, t in types.items():
        twin = language_twin(name)
        if twin is not None and types.get(twin) != t:
            out.append(f"{name} is {t}, {twin} is {types.get(twin)}")
    return out


def _architecture(path: Path) -> str:
    return str(gguf.GGUFReader(path).fields["general.architecture"].contents())


def quantize_mmproj_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "q8_0",
                         nthread: int | None = None) -> QuantizeResult:
    """Quantize an f16/f32 mmproj GGUF with llama.cpp's quantizer (see the module docstring)."""
    t0 = time.perf_counter()
    qtype = normalize_quant_type(qtype)
    if qtype not in MMPROJ_FOR.values():
        raise ConfigError(f"an mmproj is quantized to {', '.join(sorted(set(MMPROJ_FOR.values())))} only, "
                          f"not {qtype}")
    src, dst = Path(src), Path(dst)
    if not src.is_file() or _architecture(src) != "clip":
        raise ConfigError(f"{src}: not an mmproj GGUF; export it first (vlmexport.exporter.gguf_writer.export_gguf)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _run_quantize(src, dst, qtype, None, {}, nthread or 1)
    return QuantizeResult(dst, qtype, tensor_types(dst), False, 0, time.perf_counter() - t0)
