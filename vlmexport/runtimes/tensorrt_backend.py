"""The ``tensorrt`` backend: native TensorRT engines behind the shared pipeline.

NOT EXECUTED in this project so far: no GPU and no TensorRT were available where it was
written. It follows the documented TensorRT 10 Python API (``IExecutionContext``
``set_optimization_profile_async`` / ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``) and is covered by tests marked ``tensorrt`` and ``gpu`` that skip
without them. What it runs *is* checked here: the same static-cache protocol
(:class:`~vlmexport.runtimes.tensorrt_profile.StaticCacheSession`) runs the same graphs on
onnxruntime CPU in every ``--format tensorrt`` build's validation.

- One execution context per engine (vision encoder, connector, prefill, decode; a
  decoder without experts has one engine with a decode and a prefill profile).
- Buffers are torch CUDA tensors bound by name; the KV cache is two sets of
  ``[1, kv_heads, capacity, head_dim]`` buffers that swap roles each step (TensorRT
  outputs may not alias inputs, so ``present`` is written into the other set).
- Engines come from :mod:`.tensorrt_engines` (cache, or built at first load).
- ``vision="onnxruntime-trt"`` runs the vision encoder and connector through
  onnxruntime's TensorRT execution provider instead (``TensorrtExecutionProvider``, then
  ``CUDAExecutionProvider``, with its engine and timing caches under the engine cache
  directory), e.g. for INT8 QDQ vision parts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..core.errors import MissingDependencyError
from .tensorrt_engines import (
    TRT_INSTALL_HINT,
    CachedEngine,
    DeviceInfo,
    EngineError,
    EngineSpec,
    cache_root,
    detect_device,
    engine_plan,
    load_or_build,
    part_precision,
)
from .tensorrt_profile import ProfileFiles, StaticCacheSession

log = logging.getLogger(__name__)


def ort_tensorrt_providers(cache_dir: str | os.PathLike, fp16: bool = True) -> list:
    """onnxruntime providers: its TensorRT EP (engines and timing cache under ``cache_dir``), then CUDA."""
    d = str(Path(cache_dir) / "onnxruntime-trt")
    return [("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": d,
                                           "trt_timing_cache_enable": True, "trt_timing_cache_path": d,
                                           "trt_fp16_enable": fp16}),
            "CUDAExecutionProvider"]


class _Engine:  # pragma: no cover - needs TensorRT and a GPU
    """One deserialized engine and its execution context."""

    def __init__(self, trt, runtime, cached: CachedEngine, torch):
        self.spec: EngineSpec = cached.spec
        self.engine = runtime.deserialize_cuda_engine(cached.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{cached.path}: TensorRT could not deserialize this plan")
        self.context = self.engine.create_execution_context()
        self.trt, self.torch = trt, torch
        self.inputs = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                       if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT}
        self.profile = None

    def run(self, stream, profile: str, tensors: dict) -> None:
        """Bind every named tensor (torch CUDA tensors; inputs set their shapes) and execute."""
        idx = self.spec.profile_index(profile)
        if self.profile != idx:
            self.context.set_optimization_profile_async(idx, stream.cuda_stream)
            self.profile = idx
        for name, t in tensors.items():
            if name in self.inputs:
                self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT engine {self.spec.name} failed to execute")


class TensorRTExecutor:  # pragma: no cover - needs TensorRT and a GPU
    """A :class:`~vlmexport.runtimes.tensorrt_profile.ProfileExecutor` over TensorRT engines."""

    def __init__(self, bundle: Bundle, precision: str, engines: Sequence[CachedEngine], files: ProfileFiles,
                 vision: str = "tensorrt", cache_dir: str | os.PathLike | None = None, device_index: int = 0,
                 rebuild: Callable[[EngineSpec], CachedEngine] | None = None):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for e in engines:
            try:
                self.engines[e.spec.name] = _Engine(trt, runtime, e, torch)
            except EngineError:
                if rebuild is None:
                    raise
                # a plan whose key matched but that this TensorRT cannot read: rebuilt, never used
                log.warning("%s: TensorRT could not deserialize the cached plan; rebuilding", e.path)
                self.engines[e.spec.name] = _Engine(trt, runtime, rebuild(e.spec), torch)
        m = bundle.section("model")
        self.num_layers, self.capacity = int(m["num_layers"]), int(m["max_length"])
        self.dtype = np.dtype(np.float32 if precision == "fp32" else np.float16)  # int8/int4 run around fp16
        tdt = torch.float32 if precision == "fp32" else torch.float16
        shape = (1, int(m["num_kv_heads"]), self.capacity, int(m["head_dim"]))
        self.kv = [[torch.zeros(shape, dtype=tdt, device=self.device) for _ in range(2 * self.num_layers)]
                   for _ in range(2)]
        self.current = 0
        self.logits = torch.empty((1, 1, int(m["vocab_size"])), dtype=torch.float32, device=self.device)
        self.tdt = tdt
        self.ort_vision = None
        if vision == "onnxruntime-trt":
            import onnxruntime as ort

            providers = ort_tensorrt_providers(cache_root(bundle.root, cache_dir), fp16=precision != "fp32")
            self.ort_vision = (ort.InferenceSession(str(files.vision_encoder), providers=providers),
                               ort.InferenceSession(str(files.connector), providers=providers))
        elif vision != "tensorrt":
            raise EngineError(f"vision={vision!r}: use 'tensorrt' (engines) or 'onnxruntime-trt' (onnxruntime's "
                              "TensorRT execution provider)")

    def _t(self, a: np.ndarray, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(a), device=self.device, dtype=dtype)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.ort_vision is not None:
            enc, con = self.ort_vision
            feats = enc.run(["image_features"], {"pixel_values": pixel_values.astype(self.dtype)})[0]
            return con.run(["image_embeds"], {"image_features": feats.astype(self.dtype)})[0]
        torch = self.torch
        with torch.cuda.stream(self.stream):
            px = self._t(pixel_values, self.tdt)
            enc, con = self.engines["vision_encoder"], self.engines["connector"]
            n = px.shape[0]
            feats = torch.empty((n, *enc.engine.get_tensor_shape("image_features")[1:]), dtype=self.tdt,
                                device=self.device)
            enc.run(self.stream, "images", {"pixel_values": px, "image_features": feats})
            emb = torch.empty((n, *con.engine.get_tensor_shape("image_embeds")[1:]), dtype=self.tdt,
                              device=self.device)
            con.run(self.stream, "images", {"image_features": feats, "image_embeds": emb})
        self.stream.synchronize()
        return emb.float().cpu().numpy()

    def step(self, embeds, position_ids, token_type, write_index: int) -> np.ndarray:
        torch = self.torch
        decode = token_type is None
        name = "text_decoder.decode" if decode and "text_decoder.decode" in self.engines else (
            "text_decoder.prefill" if "text_decoder.prefill" in self.engines else "text_decoder")
        eng = self.engines[name]
        profile = "decode" if name.endswith("decode") or (name == "text_decoder" and embeds.shape[1] == 1) \
            else "prefill"
        src, dst = self.kv[self.current], self.kv[1 - self.current]
        with torch.cuda.stream(self.stream):
            tensors = {"inputs_embeds": self._t(embeds, self.tdt), "position_ids": self._t(position_ids, torch.int64),
                       "write_index": self._t(np.array([write_index], np.int64)), "logits": self.logits}
            if "token_type" in eng.inputs:
                tt = token_type if token_type is not None else np.zeros_like(position_ids)
                tensors["token_type"] = self._t(tt, torch.int64)
            for i in range(self.num_layers):
                for j, kind in enumerate(("key", "value")):
                    tensors[f"past_key_values.{i}.{kind}"] = src[2 * i + j]
                    tensors[f"present.{i}.{kind}"] = dst[2 * i + j]
            eng.run(self.stream, profile, tensors)
        self.stream.synchronize()
        self.current = 1 - self.current
        return self.logits[0, -1].cpu().numpy().copy()


def profile_files(bundle: Bundle, precision: str) -> ProfileFiles:
    """The files one precision of the TensorRT profile runs (int8/int4: fp16 vision parts)."""
    f = lambda part: bundle.file(bundle.find(part, "tensorrt", part_precision(bundle, part, precision)).file)
    decode = bundle.find("text_decoder", "tensorrt", precision).extra.get("decode_graph")
    return ProfileFiles(f("text_decoder"), f("token_embedding"), f("vision_encoder"), f("connector"),
                        bundle.file(decode) if decode else None)


def tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def open_tensorrt_session(bundle: Bundle, precision: str, vision: str = "tensorrt",
                          cache_dir: str | os.PathLike | None = None, device: DeviceInfo | None = None,
                          progress: Callable[[str], None] = lambda s: None) -> StaticCacheSession:  # pragma: no cover
    """Engines from the cache (built at first load), wrapped in the static-cache session."""
    if not tensorrt_available():
        raise MissingDependencyError(f"the tensorrt backend needs TensorRT; {TRT_INSTALL_HINT}")
    device = device or detect_device()
    specs = engine_plan(bundle, precision)
    if vision == "onnxruntime-trt":
        specs = [s for s in specs if s.part == "text_decoder"]
    engines = [load_or_build(bundle.root, s, device, cache_dir=cache_dir, progress=progress) for s in specs]
    files = profile_files(bundle, precision)
    m = bundle.section("model")
    ex = TensorRTExecutor(bundle, precision, engines, files, vision=vision, cache_dir=cache_dir,
                          rebuild=lambda spec: load_or_build(bundle.root, spec, device, cache_dir=cache_dir, force=True,
                                                             progress=progress))
    return StaticCacheSession(ex, files.token_embedding, int(m["hidden_size"]), int(m["vocab_size"]))


def load_tensorrt(bundle: Bundle, precision: str | None, device: str, threads: int | None, spin: bool = False):
    """The loader's ``tensorrt`` entry: engines on ``device="cuda"``; on ``device="cpu"`` the same
    TensorRT-profile graphs on onnxruntime's CPU provider (how a build validates them; named so)."""
    available = bundle.precisions("text_decoder", "tensorrt")
    if not available:
        from ..bundle import BundleError

        raise BundleError(f"{bundle.root}: has no TensorRT profile; rebuild it with `vlmexport build --format "
                          "tensorrt`")
    if precision is None:
        order = ("fp16", "fp32") if device == "cuda" else ("fp32", "fp16")
        precision = next((p for p in order if p in available), available[0])
    elif precision not in available:
        from ..bundle import BundleError

        raise BundleError(f"{bundle.root}: has no {precision} TensorRT profile (it has {available}); rebuild with "
                          f"`--format tensorrt --precision {precision}`")
    if device == "cuda":
        return open_tensorrt_session(bundle, precision), f"tensorrt-{precision}"
    from .tensorrt_profile import OrtProfileExecutor

    m = bundle.section("model")
    files = profile_files(bundle, precision)
    ex = OrtProfileExecutor(files, int(m["num_layers"]), int(m["num_kv_heads"]), int(m["head_dim"]),
                            int(m["max_length"]), threads=threads)
    log.warning("backend tensorrt on device cpu: running the TensorRT-profile graphs on onnxruntime's CPU provider")
    session = StaticCacheSession(ex, files.token_embedding, int(m["hidden_size"]), int(m["vocab_size"]))
    return session, f"tensorrt-profile-onnxruntime-cpu-{precision}"
