"""TensorRT engines for a bundle's TensorRT profile: plan, cache key, build, cache.

Engines are not portable across TensorRT versions or GPUs, so a bundle carries the
TensorRT-profile ONNX and the device builds engines from it, at first load
(``vlmexport.load(..., backend="tensorrt")``) or ahead of time (``vlmexport engines``).

- **Plan** (:func:`engine_plan`): which engines a bundle precision needs and their
  optimization profiles, derived from the manifest: the routed decoder graph gets a
  *prefill* profile (1..``max_prompt`` new tokens), the routing-free graph a *decode*
  profile (exactly 1 new token); a decoder without experts has one graph and one engine
  holding both profiles (decode first). The KV buffers' ``kv_capacity`` axis ranges over
  1..``max_length`` (never 0: an empty dimension is a different engine specialisation and
  the most common profile mistake); ``batch`` is 1 (the runtime is batch 1). Vision
  encoder and connector: 1..``max_images`` images.
- **Cache key** (:func:`cache_key`): sha256 over TensorRT version, GPU name and compute
  capability, the ONNX file's sha256 (from the manifest: a re-exported graph is a new
  key), precision, the profiles and the builder settings. The engine directory is
  ``engines/trt<version>-sm<NN>-<precision>-<key[:12]>/`` with an ``engine.json``
  naming every field; a plan is used only when its ``engine.json`` matches the expected
  key exactly, otherwise it is rebuilt, never loaded stale (a plan from another
  TensorRT fails deserialisation with "version tag does not match"; the key catches
  that before TensorRT sees the file, and the backend rebuilds (``force``) if
  deserialisation fails anyway).
- **Build** (:func:`build_engine`): TensorRT 10's Python API, a strongly typed network
  from the ONNX parser (the graph's fp16/fp32 types are the engine's: no precision
  flags), one optimization profile per :class:`Profile`, a timing cache shared by all
  engines of one TensorRT version and GPU, written atomically (temporary name, fsync,
  rename), as is the plan.

Everything except :func:`build_engine` / :func:`detect_device` runs without TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..bundle import Bundle, BundleError
from ..core.errors import MissingDependencyError, VlmexportError

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
ENGINE_META = "engine.json"
CACHE_ENV = "VLMEXPORT_ENGINE_CACHE"  # another root for engines (a read-only bundle, a shared cache)
KEY_VERSION = 1  # bump when the key's meaning changes
DEFAULT_WORKSPACE = 2 << 30
TRT_INSTALL_HINT = ("install TensorRT 10 for your CUDA: `pip install 'vlmexport[tensorrt]' --extra-index-url "
                    "https://pypi.nvidia.com` (on Jetson use JetPack's python3-libnvinfer); see docs/tensorrt.md")


# an int8 / int4 TensorRT profile quantizes the text decoder only; the other parts run fp16
TRT_PART_FALLBACK = {"int4": ("int4", "fp16"), "int8": ("int8", "fp16")}


def part_precision(bundle: Bundle, part: str, precision: str) -> str:
    """The TensorRT-profile precision ``part`` runs in when ``precision`` is asked for."""
    have = bundle.precisions(part, "tensorrt")
    for p in TRT_PART_FALLBACK.get(precision, (precision,)):
        if p in have:
            return p
    raise BundleError(f"{bundle.root}: has no {precision} TensorRT-profile {part} (it has {have or 'none'}); "
                      f"rebuild it with `vlmexport build --format tensorrt --precision {precision}`")


class EngineError(VlmexportError):
    """An engine could not be planned, built or loaded."""


# --------------------------------------------------------------------- the device
@dataclass(frozen=True)
class DeviceInfo:
    tensorrt: str  # trt.__version__, e.g. "10.3.0"
    gpu: str  # e.g. "Orin" / "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]  # (8, 7) on Jetson Orin

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def detect_device(device_index: int = 0) -> DeviceInfo:
    """This machine's TensorRT version and GPU (needs tensorrt and a CUDA torch)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(f"TensorRT is not installed; {TRT_INSTALL_HINT}") from None
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError("TensorRT engines need a CUDA GPU and a CUDA build of torch; none is visible")
    return DeviceInfo(trt.__version__, torch.cuda.get_device_name(device_index),
                      tuple(torch.cuda.get_device_capability(device_index)))


# ------------------------------------------------------------------- the plan
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ``{input: (min, opt, max)}`` for every input with a dynamic axis."""

    name: str
    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def __post_init__(self) -> None:
        for inp, (mn, opt, mx) in self.shapes.items():
            if not (len(mn) == len(opt) == len(mx)):
                raise EngineError(f"profile {self.name}: {inp} has shapes of different ranks {mn} {opt} {mx}")
            if any(a < 1 for a in mn):
                raise EngineError(f"profile {self.name}: {inp} min shape {mn} has a 0 dimension; "
                                  "profiles start at 1")
            if any(not a <= b <= c for a, b, c in zip(mn, opt, mx)):
                raise EngineError(f"profile {self.name}: {inp} needs min <= opt <= max, got {mn} {opt} {mx}")

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}}


@dataclass(frozen=True)
class EngineSpec:
    """One engine to build: the ONNX file (relative to the bundle), its sha256 and profiles."""

    name: str  # vision_encoder | connector | text_decoder | text_decoder.prefill | text_decoder.decode
    part: str
    precision: str
    onnx: str
    onnx_sha256: str
    profiles: tuple[Profile, ...]
    settings: Mapping[str, object] = field(default_factory=dict)
    data_sha256: tuple[str, ...] = ()  # its external-data file(s): new weights are a new engine

    def profile_index(self, name: str) -> int:
        for i, p in enumerate(self.profiles):
            if p.name == name:
                return i
        raise EngineError(f"engine {self.name} has no {name!r} profile (it has {[p.name for p in self.profiles]})")


def _dims(io: Sequence, values: Mapping[str, int]) -> dict[str, Shape]:
    """Concrete shapes of ``io`` (manifest TensorSpecs) with named axes taken from ``values``."""
    out = {}
    for t in io:
        shape = []
        for d in t.shape:
            if isinstance(d, str):
                if d not in values:
                    raise EngineError(f"input {t.name}: no profile value for dynamic axis {d!r}")
                shape.append(int(values[d]))
            else:
                shape.append(int(d))
        out[t.name] = tuple(shape)
    return out


def _profile(name: str, io: Sequence, lo: Mapping[str, int], opt: Mapping[str, int], hi: Mapping[str, int]) -> Profile:
    dyn = [t for t in io if any(isinstance(d, str) for d in t.shape)]
    a, b, c = _dims(dyn, lo), _dims(dyn, opt), _dims(dyn, hi)
    return Profile(name, {n: (a[n], b[n], c[n]) for n in a})


def engine_plan(bundle: Bundle, precision: str, max_prompt: int | None = None, max_images: int = 4,
                workspace: int = DEFAULT_WORKSPACE) -> list[EngineSpec]:
    """The engines one precision of a bundle's TensorRT profile needs, with their profiles."""
    m = bundle.section("model")
    max_length = int(m["max_length"])
    max_prompt = min(int(max_prompt or max_length), max_length)
    if max_prompt < 1 or max_images < 1:
        raise EngineError(f"max_prompt ({max_prompt}) and max_images ({max_images}) must be >= 1")
    opt_prompt = min(max_prompt, int(m.get("image_tokens", 0)) + 64)
    settings = {"workspace": int(workspace), "strongly_typed": True}
    specs: list[EngineSpec] = []
    for part in ("vision_encoder", "connector"):
        a = _find(bundle, part, precision)
        axes = {"num_images": 1}
        prof = _profile("images", a.inputs, axes, {"num_images": 1}, {"num_images": max_images})
        specs.append(EngineSpec(part, part, a.precision, a.file, a.sha256, (prof,), settings, _weights_sha(a)))
    a = _find(bundle, "text_decoder", precision)
    base = {"batch": 1, "kv_capacity": 1}
    top = {"batch": 1, "kv_capacity": max_length}
    prefill = dict(lo=base | {"sequence": 1}, opt=top | {"sequence": opt_prompt}, hi=top | {"sequence": max_prompt})
    decode = dict(lo=base | {"sequence": 1}, opt=top | {"sequence": 1}, hi=top | {"sequence": 1})
    decode_rel = (a.extra or {}).get("decode_graph")
    if decode_rel:  # expert model: routed prefill graph + routing-free decode graph, one engine each
        sha = _data_sha(a, decode_rel)
        weights = _weights_sha(a, exclude=decode_rel)
        specs.append(EngineSpec("text_decoder.prefill", "text_decoder", precision, a.file, a.sha256,
                                (_profile("prefill", a.inputs, prefill["lo"], prefill["opt"], prefill["hi"]),),
                                settings, weights))
        dec_inputs = [t for t in a.inputs if t.name != "token_type"]
        specs.append(EngineSpec("text_decoder.decode", "text_decoder", precision, decode_rel, sha,
                                (_profile("decode", dec_inputs, decode["lo"], decode["opt"], decode["hi"]),),
                                settings, weights))
    else:
        specs.append(EngineSpec("text_decoder", "text_decoder", precision, a.file, a.sha256,
                                (_profile("decode", a.inputs, decode["lo"], decode["opt"], decode["hi"]),
                                 _profile("prefill", a.inputs, prefill["lo"], prefill["opt"], prefill["hi"])),
                                settings, _weights_sha(a)))
    return specs


def _find(bundle: Bundle, part: str, precision: str):
    return bundle.find(part, "tensorrt", part_precision(bundle, part, precision))


def _weights_sha(artifact, exclude: str | None = None) -> tuple[str, ...]:
    return tuple(d["sha256"] for d in artifact.data_files if d["file"] != exclude)


def _data_sha(artifact, rel: str) -> str:
    for d in artifact.data_files:
        if d["file"] == rel:
            return d["sha256"]
    raise BundleError(f"the manifest lists no sha256 for {rel}; rebuild the bundle")


# -------------------------------------------------------------------- the key
def cache_key(spec: EngineSpec, device: DeviceInfo) -> dict:
    """Every field an engine depends on (stored as ``engine.json``), plus its ``key`` digest."""
    fields = {"key_version": KEY_VERSION, "tensorrt": device.tensorrt, "gpu": device.gpu,
              "compute_capability": list(device.compute_capability), "engine": spec.name, "onnx": spec.onnx,
              "onnx_sha256": spec.onnx_sha256, "data_sha256": list(spec.data_sha256), "precision": spec.precision,
              "profiles": [p.to_dict() for p in spec.profiles], "settings": dict(sorted(spec.settings.items()))}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return fields | {"key": digest}


def cache_root(bundle_root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(cache_dir) if cache_dir else (Path(env) if env else Path(bundle_root) / ENGINE_DIR)


def engine_dir(root: Path, spec: EngineSpec, device: DeviceInfo, key: str) -> Path:
    version = device.tensorrt.replace("+", "_")
    return root / f"trt{version}-{device.sm}-{spec.precision}-{key[:12]}"


def timing_cache_path(root: Path, device: DeviceInfo) -> Path:
    return root / f"timing-trt{device.tensorrt.replace('+', '_')}-{device.sm}.cache"


@dataclass(frozen=True)
class CachedEngine:
    spec: EngineSpec
    path: Path  # the .plan
    meta: dict
    built: bool  # built now (False: found valid in the cache)


def lookup(root: Path, spec: EngineSpec, device: DeviceInfo) -> tuple[Path, dict, bool]:
    """(plan path, expected key fields, whether a matching plan is cached)."""
    meta = cache_key(spec, device)
    d = engine_dir(root, spec, device, meta["key"])
    plan, meta_path = d / f"{spec.name}.plan", d / ENGINE_META
    if plan.is_file() and meta_path.is_file():
        try:
            found = json.loads(meta_path.read_text())
        except ValueError:
            found = None
        if found == meta | {"plan_bytes": plan.stat().st_size}:
            return plan, meta, True
        log.warning("%s: cached engine does not match (%s); rebuilding", d, _first_difference(found, meta))
    return plan, meta, False


def _first_difference(found, want: dict) -> str:
    if not isinstance(found, dict):
        return "unreadable engine.json"
    for k in want:
        if found.get(k) != want[k]:
            return f"{k}: cached {found.get(k)!r}, expected {want[k]!r}"
    return "plan size differs from engine.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def store(plan_path: Path, meta: dict, plan: bytes) -> None:
    """Write the plan, then its ``engine.json`` (a plan without matching metadata is never used)."""
    (plan_path.parent / ENGINE_META).unlink(missing_ok=True)
    atomic_write_bytes(plan_path, plan)
    atomic_write_bytes(plan_path.parent / ENGINE_META,
                       json.dumps(meta | {"plan_bytes": len(plan)}, indent=1, sort_keys=True).encode())


Builder = Callable[[Path, EngineSpec, Path], bytes]  # (onnx path, spec, timing cache path) -> serialized plan


def load_or_build(bundle_root: Path, spec: EngineSpec, device: DeviceInfo, builder: Builder | None = None,
                  cache_dir: str | os.PathLike | None = None, force: bool = False,
                  progress: Callable[[str], None] = lambda s: None) -> CachedEngine:
    """The engine for ``spec`` on ``device``: from the cache when its key matches, else built and stored."""
    root = cache_root(bundle_root, cache_dir)
    plan, meta, hit = lookup(root, spec, device)
    if hit and not force:
        return CachedEngine(spec, plan, meta, False)
    progress(f"build TensorRT engine {spec.name} ({spec.precision}, {device.gpu} {device.sm}, TensorRT "
             f"{device.tensorrt})")
    data = (builder or build_engine)(Path(bundle_root) / spec.onnx, spec, timing_cache_path(root, device))
    store(plan, meta, data)
    return CachedEngine(spec, plan, meta, True)


# ----------------------------------------------------------------- TensorRT itself
def build_engine(onnx_path: Path, spec: EngineSpec, timing_cache: Path) -> bytes:  # pragma: no cover - needs TensorRT
    """A serialized engine for ``onnx_path`` (TensorRT 10 Python API; strongly typed)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(f"building engines needs TensorRT; {TRT_INSTALL_HINT}") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves the .onnx.data file next to it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {'; '.join(errors[:5])}; "
                          "run `vlmexport doctor BUNDLE --target ...` to see what it lacks")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.settings.get("workspace", DEFAULT_WORKSPACE)))
    for prof in spec.profiles:
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.shapes.items():
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} failed to build an engine for {onnx_path} (see its log above)")
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_bundle_engines(bundle: Bundle, precision: str, device: DeviceInfo | None = None,
                         builder: Builder | None = None, cache_dir: str | os.PathLike | None = None,
                         max_prompt: int | None = None, max_images: int = 4, force: bool = False,
                         progress: Callable[[str], None] = lambda s: None) -> list[CachedEngine]:
    """Every engine of one precision (what ``vlmexport engines`` runs)."""
    device = device or detect_device()
    return [load_or_build(bundle.root, spec, device, builder, cache_dir, force, progress)
            for spec in engine_plan(bundle, precision, max_prompt, max_images)]


def describe(engines: Sequence[CachedEngine]) -> list[dict]:
    return [{"engine": e.spec.name, "plan": str(e.path), "built": e.built, "key": e.meta["key"][:12],
             "profiles": [asdict(p)["name"] for p in e.spec.profiles]} for e in engines]
