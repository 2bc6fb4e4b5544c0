"""The ``llamacpp`` backend: the GGUF export behind the shared pipeline, through
llama-cpp-python's low-level API (text decoder) and its libmtmd bindings (images).

How it maps the :class:`~vlmexport.core.generation.DecoderSession` protocol:

``encode_images``
    libmtmd encodes each image. It takes 8-bit RGB, letterboxes anything that does not
    already have the model's size, and then only normalises: ``(u8 / 255 - mean) / std``
    in float32 with the mean/std stored in the mmproj GGUF (``mtmd_image_preproc_out``
    in tools/mtmd/mtmd-image.cpp). The runtime has already resized and normalised the
    image with its own preprocessing (``vlmexport.core.preprocess.to_pixels``: the same
    float32 formula on the resized 8-bit image), so we invert the normalisation, round to
    8 bits and hand libmtmd an image of exactly the model's size: no letterboxing, and the
    pixels libmtmd computes are bit-identical to ours. Pixels that did not come from an
    8-bit image are rounded to 8 bits (logged, with the largest change).
``prefill``
    Text runs are decoded as token batches and image chunks as embedding batches, at
    positions 0..n-1. llama.cpp's ``cogvlm`` graph picks the expert per batch: token
    batches run the language expert, embedding batches the visual expert, which is the
    ``image_chunk`` routing; and its causal mask compares positions, so it runs
    ``sequential`` positions only (:data:`LLAMA_CPP_SEMANTICS`). A layout of other
    semantics (``hf_cogvlm``: repeated image positions, eoi on the language expert) is run
    in llama.cpp's semantics, with a warning saying so: handing llama.cpp the repeated
    positions would let the image positions attend to each other both ways, which is
    neither the model's semantics nor llama.cpp's. ``decode`` positions follow.
    Logits: that graph does not select output rows, so when only the last position of a
    multi-token batch asks for logits, llama.cpp returns the row of the batch's *first*
    token. We therefore decode the prompt's last position alone, in a batch of one.
``decode``
    One token batch of one token at the given position.
``reset``
    Clears the KV cache (``llama_memory_clear``).

Errors about files are :class:`GGUFFileError` (one line naming the file and what to do).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import MissingDependencyError, VlmexportError
from ..core.layout import LANGUAGE, VISION, SequenceLayout
from ..core.names import Part, gguf_is_visual_expert
from .environment import cpu_flags, physical_cores
from .llamacpp_lib import INSTALL_HINT, LOG_SINK, init_backend, llamacpp_available  # noqa: F401

log = logging.getLogger(__name__)

# (expert_routing, position_ids) that llama.cpp runs, whatever the layout asks for (module doc)
LLAMA_CPP_SEMANTICS = ("image_chunk", "sequential")
GGUF_MAGIC = b"GGUF"


class GGUFFileError(VlmexportError):
    """A GGUF file is missing, truncated, of another model or does not fit its partner file."""


# --------------------------------------------------------------------- GGUF headers
@dataclass(frozen=True)
class GGUFInfo:
    """The few header facts the session checks before handing a file to llama.cpp."""

    path: Path
    architecture: str
    file_type: str  # general.type: "model" | "mmproj" | ""
    fields: dict[str, Any]
    tensors: tuple[str, ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def read_gguf_info(path: str | os.PathLike, what: str = "GGUF file") -> GGUFInfo:
    """Parse a GGUF header (metadata and tensor infos) and check that the file holds all the
    tensor data its header promises. Raises :class:`GGUFFileError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise GGUFFileError(f"{p}: no such {what}; check the path or re-export the GGUF files")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFFileError(f"{p}: not a GGUF file (it starts with {magic!r}); point to a .gguf {what} or re-export it")
    try:
        gguf = importlib.import_module("gguf")
    except ImportError:
        raise MissingDependencyError(f"the gguf package is not installed; {INSTALL_HINT}") from None
    size = p.stat().st_size
    from .gguf_header import GGUFHeaderError, check_gguf_header

    try:  # bounded first: GGUFReader loops on a count the file cannot hold (runtimes/gguf_header.py)
        check_gguf_header(p)
    except GGUFHeaderError as exc:
        raise GGUFFileError(f"{p}: the GGUF header cannot be read ({exc}); the file is truncated or corrupt: copy it "
                            "again or re-export it") from None
    try:
        reader = gguf.GGUFReader(p)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=reader.data_offset)
    except Exception as exc:  # the reader raises ValueError / IndexError / struct errors on a cut header
        raise GGUFFileError(f"{p}: the GGUF header cannot be read ({exc.__class__.__name__}); the file is truncated or "
                            f"corrupt: copy it again or re-export it") from None
    if end > size:
        raise GGUFFileError(f"{p}: the file is truncated ({size:,} bytes, its header describes {end:,}); copy it again "
                            "or re-export it")
    fields: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
            continue
        try:
            fields[key] = fld.contents()
        except Exception:  # an exotic value type: not one we look at
            pass
    return GGUFInfo(p, str(fields.get("general.architecture", "")), str(fields.get("general.type", "")), fields,
                    tuple(t.name for t in reader.tensors))


def check_pair(text: GGUFInfo, mmproj: GGUFInfo | None, expected_arch: str | None = None) -> None:
    """The text GGUF is a text model of the expected architecture; the mmproj is an mmproj
    whose embeddings have the text model's width."""
    if text.architecture == "clip" or text.file_type == Part.MMPROJ:
        raise GGUFFileError(f"{text.path}: this is an mmproj (vision) GGUF, not a text model; pass the text GGUF as "
                            "the model and this file as the mmproj")
    if expected_arch is not None and text.architecture != expected_arch:
        raise GGUFFileError(f"{text.path}: holds a {text.architecture or 'unknown'!r} model but a {expected_arch!r} "
                            "text model is expected; use the GGUF exported from this bundle's model (re-export it)")
    if mmproj is None:
        return
    if mmproj.architecture != "clip":
        raise GGUFFileError(f"{mmproj.path}: holds a {mmproj.architecture or 'unknown'!r} model, not an mmproj "
                            "(vision) GGUF; pass the mmproj-*.gguf file exported with the text model")
    n_text = text.get(f"{text.architecture}.embedding_length")
    n_proj = mmproj.get("clip.vision.projection_dim")
    if n_text is not None and n_proj is not None and int(n_text) != int(n_proj):
        raise GGUFFileError(f"{mmproj.path}: its image embeddings are {n_proj} wide but the text model "
                            f"{text.path.name} expects {n_text}; it belongs to another model: use the mmproj exported "
                            "together with this text GGUF")


EXTRA_BUFTS_ENV = "VLMEXPORT_LLAMACPP_EXTRA_BUFTS"


_AMX_PROBE: dict[str, bool] = {}  # per process: did a quantized matmul with AMX repacking survive?
_PROBE = """
import sys, llama_cpp.llama_cpp as L
quiet = L.llama_log_callback(lambda *a: None)  # kept referenced: a collected callback is a dangling pointer
L.llama_log_set(quiet, None)
L.llama_backend_init()
m = L.llama_model_load_from_file(sys.argv[1].encode(), L.llama_model_default_params())
cp = L.llama_context_default_params(); cp.n_ctx = cp.n_batch = cp.n_ubatch = 8; cp.n_threads = cp.n_threads_batch = 1
c = L.llama_init_from_model(m, cp)
t = (L.llama_token * 2)(1, 2)
sys.exit(L.llama_decode(c, L.llama_batch_get_one(t, 2)))
"""


def extra_buffer_types(text_gguf: GGUFInfo | None = None) -> bool:
    """Whether llama.cpp may repack weights into its CPU extra buffer types (AMX, AVX
    repacking). ``VLMEXPORT_LLAMACPP_EXTRA_BUFTS=0``/``1`` decides; otherwise, where the CPU
    reports AMX and the file holds quantized weights, a subprocess decodes two tokens with
    repacking on, once per process: some virtual machines (Firecracker here) report AMX
    but fault on its tile registers (SIGSEGV in ggml_backend_amx_mul_mat), and a crash
    there must not take the caller's process down."""
    env = os.environ.get(EXTRA_BUFTS_ENV, "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    if text_gguf is None or not _cpu_has_amx():
        return True
    if "amx" not in _AMX_PROBE:
        import subprocess
        import sys

        try:
            rc = subprocess.run([sys.executable, "-c", _PROBE, str(text_gguf.path)], capture_output=True,
                                timeout=300).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        _AMX_PROBE["amx"] = rc == 0
        if rc != 0:
            log.warning("llama.cpp's AMX kernels crash on this machine (probe exit %s); running without weight "
                        "repacking (set %s=1 to force it)", rc, EXTRA_BUFTS_ENV)
    return _AMX_PROBE["amx"]


def load_text_model(lib, info: GGUFInfo, n_gpu_layers: int = 0):
    """``llama_model_load_from_file`` of a text GGUF, with weight repacking where
    :func:`extra_buffer_types` allows it; a GGUFFileError line if llama.cpp refuses the file."""
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    quantized = info.get("general.file_type", 1) not in (0, 1, 32)  # f32, f16, bf16
    if not extra_buffer_types(info if quantized else None):
        # ggml's CPU "extra" buffer types repack quantized weights for AMX / AVX kernels; see extra_buffer_types.
        mp.use_extra_bufts = False
    model = lib.llama_model_load_from_file(str(info.path).encode(), mp)
    if not model:
        raise GGUFFileError(f"{info.path}: llama.cpp could not load this text GGUF ({LOG_SINK.take() or 'no detail'}); "
                            "re-export it with this vlmexport version")
    return model


def _cpu_has_amx() -> bool:
    return "amx_int8" in cpu_flags()


# ----------------------------------------------------------------------- the session
class LlamaCppSession:
    """A :class:`~vlmexport.core.generation.DecoderSession` over a text GGUF and its mmproj.

    ``n_ctx`` defaults to the model's trained context; ``n_threads`` to the physical
    cores; ``n_gpu_layers`` offloads that many layers (and libmtmd's encoder) where
    llama-cpp-python was built with a GPU backend. ``expected_arch`` (the bundle's
    ``gguf_arch``) guards against a text GGUF of another model. ``kv_type`` is the KV
    cache precision ("f16", llama.cpp's default, or "f32"); ``flash_attn`` None keeps
    llama.cpp's "auto" (on for CPU, which rounds attention inputs to f16: False plus
    ``kv_type="f32"`` makes the decoder match float32 references to ~1e-6). A prompt run is
    handed to llama.cpp in one call and computed ``n_ubatch`` positions at a time.
    """

    def __init__(self, text_gguf: str | os.PathLike, mmproj_gguf: str | os.PathLike | None = None, *,
                 n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int = 0,
                 expected_arch: str | None = None, kv_type: str = "f16", flash_attn: bool | None = None,
                 n_ubatch: int = 512):
        self._lib, self._mtmd = init_backend()
        self.text_info = read_gguf_info(text_gguf, "text GGUF")
        self.mmproj_info = read_gguf_info(mmproj_gguf, "mmproj GGUF") if mmproj_gguf is not None else None
        check_pair(self.text_info, self.mmproj_info, expected_arch)
        trained = self.text_info.get(f"{self.text_info.architecture}.context_length")
        too_long = isinstance(trained, int) and isinstance(n_ctx, int) and n_ctx > trained
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 1 or too_long):
            raise GGUFFileError(f"{self.text_info.path}: n_ctx {n_ctx!r} must be a positive number of tokens up to the "
                                f"model's trained context ({trained}); lower it (or fix the bundle's max_length)")
        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type must be 'f16' or 'f32', got {kv_type!r}")
        lib = self._lib
        self.model = self.ctx = self.mctx = None
        self._batches: list[Any] = []
        self.n_threads = n_threads or physical_cores()  # llama.cpp runs best on physical cores
        if n_gpu_layers and not lib.llama_supports_gpu_offload():
            log.warning("llama-cpp-python was built without a GPU backend; n_gpu_layers=%d is ignored", n_gpu_layers)
            n_gpu_layers = 0
        self.n_gpu_layers = n_gpu_layers

        self.model = load_text_model(lib, self.text_info, n_gpu_layers)
        vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.n_embd = int(lib.llama_model_n_embd(self.model))
        self.max_length = int(n_ctx or lib.llama_model_n_ctx_train(self.model))

        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = self.max_length
        cp.n_ubatch = min(n_ubatch, self.max_length)  # compute buffers scale with n_ubatch, not the prompt
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        t = lib.GGML_TYPE_F32 if kv_type == "f32" else lib.GGML_TYPE_F16
        cp.type_k = cp.type_v = t
        if flash_attn is not None:
            cp.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise GGUFFileError(f"{self.text_info.path}: llama.cpp could not create a context "
                                f"({LOG_SINK.take() or 'no detail'}); lower n_ctx or free memory")
        self.memory = lib.llama_get_memory(self.ctx)
        self._flash_attn = flash_attn
        self._tok = self._new_batch(0)
        self._emb = self._new_batch(self.n_embd)
        self._warned_routing = False
        self._pos_shift = 0  # llama.cpp position - layout position, after a prefill (module doc)
        self._warned_pixels = False  # the 8-bit rounding warning, once per session
        # a text model with visual experts picks the expert per batch kind (tokens vs embeddings)
        self.has_experts = any(gguf_is_visual_expert(name) for name in self.text_info.tensors)

        if self.mmproj_info is not None:
            self._init_mtmd()

    # -------------------------------------------------------------- setup helpers
    def _new_batch(self, embd: int):
        lib = self._lib
        b = lib.llama_batch_init(self.max_length, embd, 1)
        self._batches.append(b)
        n = self.max_length
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):
            b.seq_id[i][0] = 0
        return b

    def _init_mtmd(self) -> None:
        mtmd, info = self._mtmd, self.mmproj_info
        p = mtmd.mtmd_context_params_default()
        p.use_gpu = self.n_gpu_layers > 0
        p.n_threads = self.n_threads
        p.print_timings = False
        p.warmup = False
        if self._flash_attn is not None:
            p.flash_attn_type = 1 if self._flash_attn else 0
        self.mctx = mtmd.mtmd_init_from_file(str(info.path).encode(), self.model, p)
        if not self.mctx:
            detail = LOG_SINK.take() or "no detail"
            self.close()
            raise GGUFFileError(f"{info.path}: libmtmd could not load this mmproj ({detail}); use the mmproj exported "
                                "together with the text GGUF")
        self.image_size = int(info.get("clip.vision.image_size"))
        self.image_mean = np.asarray(info.get("clip.vision.image_mean"), np.float32)
        self.image_std = np.asarray(info.get("clip.vision.image_std"), np.float32)

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "mctx", None):
            self._mtmd.mtmd_free(self.mctx)
            self.mctx = None
        for b in getattr(self, "_batches", []):
            lib.llama_batch_free(b)
        self._batches = []
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # pragma: no cover - interpreter-dependent
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "LlamaCppSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------- images
    def pixels_to_u8(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] normalised float32 -> [N, S, S, 3] uint8, inverting libmtmd's normalisation."""
        x = np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1)
        u8 = np.clip(np.rint((x * self.image_std + self.image_mean) * 255.0), 0, 255).astype(np.uint8)
        back = (u8.astype(np.float32) / np.float32(255.0) - self.image_mean) / self.image_std
        diff = float(np.max(np.abs(back - x))) if x.size else 0.0
        if diff > 1e-5 and not self._warned_pixels:
            self._warned_pixels = True
            log.warning("llama.cpp takes 8-bit images: these pixels were rounded to 8 bits (largest change %.3g in "
                        "normalised units); preprocess images with the bundle's preprocessing to avoid this", diff)
        return u8

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.mctx is None:
            raise VlmexportError("this llama.cpp session was opened without an mmproj GGUF; pass mmproj_gguf to "
                                 "encode images")
        px = np.asarray(pixel_values)
        if px.ndim != 4 or px.shape[1] != 3 or px.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be [N, 3, {self.image_size}, {self.image_size}] (already resized to "
                             f"the model's size, or libmtmd letterboxes them); got {list(px.shape)}")
        return np.stack([self._encode_one(img) for img in self.pixels_to_u8(px)])

    def _encode_one(self, rgb: np.ndarray) -> np.ndarray:
        mtmd = self._mtmd
        h, w, _ = rgb.shape
        data = np.ascontiguousarray(rgb)
        bitmap = mtmd.mtmd_bitmap_init(w, h, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            part = mtmd.mtmd_input_part(text=None, bitmap=bitmap)
            parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
            if mtmd.mtmd_tokenize_from_parts(self.mctx, chunks, parts, 1, False) != 0:
                raise RuntimeError(f"libmtmd could not take the image ({LOG_SINK.take() or 'no detail'})")
            chunk = None
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                c = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    chunk = c
            if chunk is None:
                raise RuntimeError("libmtmd returned no image chunk for the image")
            n_tok = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            if mtmd.mtmd_encode_chunk(self.mctx, chunk) != 0:
                raise RuntimeError(f"libmtmd failed to encode the image ({LOG_SINK.take() or 'no detail'})")
            out = mtmd.mtmd_get_output_embd(self.mctx)
            return np.ctypeslib.as_array(out, shape=(n_tok * self.n_embd,)).reshape(n_tok, self.n_embd).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    # ------------------------------------------------------------------ decoding
    def reset(self) -> None:
        self._lib.llama_memory_clear(self.memory, True)

    def _run(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} ({LOG_SINK.take() or 'no detail'})")

    def _decode_tokens(self, ids: Sequence[int], positions: Sequence[int], logits: Sequence[bool]) -> None:
        """One token batch (language expert in llama.cpp's cogvlm graph)."""
        n = len(ids)
        b = self._tok
        np.ctypeslib.as_array(b.token, shape=(self.max_length,))[:n] = np.asarray(ids, np.int32)
        np.ctypeslib.as_array(b.pos, shape=(self.max_length,))[:n] = np.asarray(positions, np.int32)
        np.ctypeslib.as_array(b.logits, shape=(self.max_length,))[:n] = np.asarray(logits, np.int8)
        self._run(b, n)

    def _decode_embeds(self, embeds: np.ndarray, positions: Sequence[int], logits: Sequence[bool]) -> None:
        """One embedding batch (visual expert in llama.cpp's cogvlm graph)."""
        n = embeds.shape[0]
        b = self._emb
        e = np.ascontiguousarray(embeds, np.float32)
        np.ctypeslib.as_array(b.embd, shape=(self.max_length * self.n_embd,))[: e.size] = e.reshape(-1)
        np.ctypeslib.as_array(b.pos, shape=(self.max_length,))[:n] = np.asarray(positions, np.int32)
        np.ctypeslib.as_array(b.logits, shape=(self.max_length,))[:n] = np.asarray(logits, np.int8)
        self._run(b, n)

    def _logits(self, i: int = -1) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no logits ({LOG_SINK.take() or 'no detail'})")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, layout: SequenceLayout, image_embeds: np.ndarray | None) -> np.ndarray:
        n = len(layout)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.max_length:
            raise ValueError(f"the prompt has {n} positions; the context holds {self.max_length}")
        flat = None
        n_img = int(layout.is_image.sum())
        if n_img:
            if image_embeds is None:
                raise ValueError(f"the prompt has {n_img} image positions but no image embeddings were given")
            emb = np.asarray(image_embeds, np.float32)
            if emb.shape[-1] != self.n_embd:
                raise ValueError(f"image embeddings are {emb.shape[-1]} wide; this text model takes {self.n_embd}")
            flat = emb.reshape(-1, self.n_embd)
            if flat.shape[0] != n_img:
                raise ValueError(f"the prompt has {n_img} image positions but {flat.shape[0]} image embeddings "
                                 "were given")
        self._check_semantics(layout)
        self._pos_shift = n - int(layout.next_position)
        self.reset()
        runs = _runs(layout)
        # the last position is decoded alone and is the only one asking for logits (see module doc)
        last_start, last_end, last_img = runs[-1]
        if last_end - last_start > 1:
            runs[-1] = (last_start, last_end - 1, last_img)
            runs.append((last_end - 1, last_end, last_img))
        img_offset = np.cumsum(layout.is_image) - layout.is_image  # index into flat per position
        for k, (s, e, is_img) in enumerate(runs):
            want = np.zeros(e - s, bool)
            if k == len(runs) - 1:
                want[-1] = True
            pos = np.arange(s, e)  # llama.cpp's sequential positions (module doc)
            if is_img:
                o = int(img_offset[s])
                self._decode_embeds(flat[o:o + (e - s)], pos, want)
            else:
                self._decode_tokens(layout.input_ids[s:e], pos, want)
        return self._logits(-1)

    def decode(self, token: int, position: int) -> np.ndarray:
        self._decode_tokens([int(token)], [int(position) + self._pos_shift], [True])
        return self._logits(-1)

    def _check_semantics(self, layout: SequenceLayout) -> None:
        """Warn once when ``layout`` asks for semantics llama.cpp does not run (module doc)."""
        if self._warned_routing:
            return
        wrong = int(np.sum((layout.is_image & (layout.token_type != VISION))
                           | (~layout.is_image & (layout.token_type != LANGUAGE)))) if self.has_experts else 0
        moved = int(np.sum(layout.position_ids != np.arange(len(layout))))
        if wrong or moved:
            self._warned_routing = True
            log.warning("llama.cpp runs its own semantics: every position its own position id%s; this prompt was "
                        "laid out otherwise (%d position(s) on another position id, %d routed to the other expert: "
                        "hf_cogvlm semantics), so it runs as llama.cpp's cogvlm model, not as the reference; the "
                        "difference measured at build time is in the bundle's semantics_deviations",
                        ", image embeddings (boi..eoi) on the visual expert and text on the language expert"
                        if self.has_experts else "", moved, wrong)


def _runs(layout: SequenceLayout) -> list[tuple[int, int, bool]]:
    """(start, end, is_image) of each text run and each image chunk, in order."""
    runs: list[tuple[int, int, bool]] = []
    spans = {s: s + n for s, n in layout.image_spans}
    i, n = 0, len(layout)
    while i < n:
        if i in spans:
            runs.append((i, spans[i], True))
            i = spans[i]
            continue
        j = i
        while j < n and not layout.is_image[j]:
            j += 1
        runs.append((i, j, False))
        i = j
    return runs
