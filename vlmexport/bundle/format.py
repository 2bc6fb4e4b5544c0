"""The bundle format: one directory a device runs without the training code.

This is the one neutral module that the exporter writes bundles with and every runtime
reads them with. It imports the standard library and ``vlmexport.core`` only (never
torch, the model registry, training or the exporter), because a Jetson runtime image
installs numpy and onnxruntime alone. When a bundle is written, ``card`` (pure python,
in this package) renders its README.

Layout (paths are POSIX, relative to the bundle directory)::

    manifest.json            this module's schema (see ``SCHEMA_VERSION``)
    tokenizer.model and/or tokenizer.json (+ tokenizer_config.json), preprocessor_config.json,
    chat_template.jinja
    onnx/<part>.<precision>.onnx (+ .onnx.data), onnx/token_embedding.<precision>.safetensors
    gguf/..., engines/...    other formats; nothing here assumes ONNX
    README.md                model card generated from the manifest

``manifest.json`` holds ``kind`` and ``schema_version``, the sections named in
``SECTIONS`` (model config, tokenizer, preprocessing, chat template, calibration,
validation, benchmarks, semantics deviations, tool versions), one entry per
:class:`Artifact`, and ``files`` / ``file_sizes``: the sha256 and size of every file in
the bundle except ``manifest.json`` itself.

Writing (:class:`BundleWriter`) builds in a temporary sibling directory and renames it
into place only when everything, hashes and README included, has been written; an
interrupted build leaves nothing and keeps the previous bundle. Reading
(:meth:`Bundle.open`) checks the schema version, that every path stays inside the
bundle, and sizes and sha256 (streamed) of every listed file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping

from ..core.atomic import atomic_directory
from ..core.errors import BundleError, VlmexportError  # noqa: F401  (BundleError re-exported)
from .card import render_model_card
from .schema import read_manifest_json, validate_container
from .names import (  # noqa: F401
    KIND,
    MANIFEST,
    PART_PRECISION_FALLBACK,
    README,
    RESERVED,
    SCHEMA_VERSION,
    SECTIONS,
    artifact_file,
    part_precision,
)

VERIFY_MODES = ("full", "size", "none")
DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                    "uint8", "bool"})
HASH_CHUNK = 8 << 20  # 8 MiB: artifacts can be many GB
# Distributions whose versions go into tool_versions when installed (read from their
# metadata: nothing is imported, in particular not torch).
TOOL_DISTRIBUTIONS = ("vlmexport", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "gguf",
                      "tensorrt", "llama-cpp-python", "safetensors", "sentencepiece", "nvidia-modelopt")
_HINT_REBUILD = "rebuild the bundle with `vlmexport build`"
_HINT_RELATIVE = "give a path relative to the bundle directory"


# BundleError lives in core.errors (the schema raises it too); importable from here as before.


# ------------------------------------------------------------------------ dataclasses
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: numpy-style dtype, shape of ints and axis names."""

    name: str
    dtype: str  # "float32", "float16", "int64", "int32", "bool", ...
    shape: tuple[int | str, ...]  # ints, or dynamic axis names: "batch", "sequence", ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if not isinstance(self.name, str) or not self.name:
            raise BundleError(f"tensor name {self.name!r} must be a non-empty string")
        if self.dtype not in DTYPES:
            raise BundleError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        for d in self.shape:
            ok = (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d)
            if not ok:
                raise BundleError(f"tensor {self.name!r}: shape entry {d!r} must be a size >= 0 or an axis name")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class Artifact:
    """One exported part in one format and precision.

    ``data_files`` are the files the main file needs beside it (ONNX external data):
    dicts ``{"file", "sha256", "size_bytes"}``. Sequences are tuples (frozen).
    """

    part: str
    format: str  # "onnx", "safetensors", "gguf", "tensorrt", ...
    precision: str  # "fp32", "fp16", "int8", "int4", "q4_k_m", ...
    file: str
    sha256: str
    size_bytes: int
    data_files: tuple[dict[str, Any], ...] = ()
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("data_files", "inputs", "outputs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def key(self) -> str:
        return f"{self.part} {self.format} {self.precision}"

    @property
    def total_size_bytes(self) -> int:
        """Main file plus its data files."""
        return self.size_bytes + sum(int(d["size_bytes"]) for d in self.data_files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part, "format": self.format, "precision": self.precision, "file": self.file,
            "sha256": self.sha256, "size_bytes": self.size_bytes,
            "data_files": [dict(d) for d in self.data_files],
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Artifact":
        return cls(
            part=d["part"], format=d["format"], precision=d["precision"], file=d["file"],
            sha256=d["sha256"], size_bytes=int(d["size_bytes"]),
            data_files=tuple({"file": f["file"], "sha256": f["sha256"], "size_bytes": int(f["size_bytes"])}
                             for f in d.get("data_files", ())),
            inputs=tuple(TensorSpec.from_dict(t) for t in d.get("inputs", ())),
            outputs=tuple(TensorSpec.from_dict(t) for t in d.get("outputs", ())),
            extra=dict(d.get("extra") or {}),
        )


# ------------------------------------------------------------------------ helpers
def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 8 MiB chunks (artifacts can be many GB)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of python and the installed tools, from package metadata (no imports)."""
    out = {"python": platform.python_version()}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _name(x: Any, what: str) -> str:
    if isinstance(x, Enum):
        x = x.value
    if not isinstance(x, str) or not x:
        raise BundleError(f"artifact {what} {x!r} must be a non-empty string")
    return x


def _json_default(x: Any) -> Any:
    if isinstance(x, Enum):
        return x.value
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if is_dataclass(x) and not isinstance(x, type):
        return x.to_dict() if hasattr(x, "to_dict") else asdict(x)
    if hasattr(x, "tolist"):  # numpy scalars and arrays, without importing numpy
        return x.tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _to_json_value(value: Any, what: str) -> Any:
    """A deep, JSON-normal copy (tuples -> lists, numpy -> python) or a clear error."""
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"manifest section {what!r} cannot be stored as JSON ({exc})") from None


def _bad_path(rel: Any) -> str | None:
    """Why ``rel`` is not a safe relative bundle path, or None."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return "is not a relative file name"
    win = PureWindowsPath(rel)
    if PurePosixPath(rel).is_absolute() or win.is_absolute() or win.drive or win.root:
        return "is absolute and escapes the bundle"
    if ".." in PurePosixPath(rel).parts or ".." in win.parts:
        return "contains '..' and escapes the bundle"
    return None


def _inside(root_resolved: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(root_resolved)
        return True
    except ValueError:
        return False


def _resolve(root: Path, rel: Any, source: str, hint: str = _HINT_REBUILD) -> Path:
    """``root / rel`` after checking that it stays inside ``root`` (following symlinks)."""
    why = _bad_path(rel)
    if why is None and not _inside(root.resolve(), root / rel):
        why = "resolves outside the bundle (a symlink?) and escapes the bundle"
    if why:
        raise BundleError(f"{source}: path {rel!r} {why}; refusing to use it, {hint}")
    return root / PurePosixPath(rel)


# ------------------------------------------------------------------------ writing
class BundleWriter:
    """Build a bundle atomically::

        with BundleWriter("out/bundle") as w:
            w.add_file("tokenizer.model", src)
            onnx.save(model, w.path("onnx/vision_encoder.fp32.onnx"))
            w.add_artifact("vision_encoder", "onnx", "fp32", "onnx/vision_encoder.fp32.onnx",
                           inputs=[TensorSpec("pixel_values", "float32", ["batch", 3, 224, 224])],
                           outputs=[...])
            w.set_section("model", config.to_dict())

    Files are hashed when the block ends; then ``manifest.json`` and ``README.md`` are
    written and the directory is renamed into place. An existing bundle at ``out_dir``
    is replaced only then; an exception (or Ctrl-C) leaves it untouched.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self._cm = None
        self._root: Path | None = None
        self._artifacts: list[dict[str, Any]] = []
        self._sections: dict[str, Any] = {}
        self._deviations: list[Any] = []
        self.manifest: dict[str, Any] | None = None  # the written manifest, after the block

    # ------------------------------------------------------------- context manager
    def __enter__(self) -> "BundleWriter":
        if self._cm is not None:
            raise BundleError("a BundleWriter builds one bundle; create a new one")
        _check_replaceable(self.out_dir)
        self._cm = atomic_directory(self.out_dir)
        self._root = self._cm.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        cm = self._cm
        if exc_type is None:
            try:
                self._finalize()
            except BaseException:
                cm.__exit__(*sys.exc_info())
                raise
        try:
            return bool(cm.__exit__(exc_type, exc, tb))
        finally:
            self._root = None

    @property
    def root(self) -> Path:
        """The temporary directory being built (renamed to ``out_dir`` at the end)."""
        if self._root is None:
            raise BundleError("BundleWriter.root is only available inside its `with` block")
        return self._root

    # ------------------------------------------------------------- files
    def path(self, rel: str | os.PathLike) -> Path:
        """Where to write ``rel`` inside the bundle; parent directories are created."""
        rel = os.fspath(rel)
        p = _resolve(self.root, rel, "bundle", _HINT_RELATIVE)
        if PurePosixPath(rel).as_posix() in RESERVED:
            raise BundleError(f"{rel} is written by the bundle writer itself; choose another file name")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_file(self, rel: str | os.PathLike, src_path: str | os.PathLike) -> Path:
        """Copy ``src_path`` into the bundle as ``rel``."""
        src = Path(src_path)
        if not src.is_file():
            raise BundleError(f"cannot add {src} to the bundle: it is not a file; check the path")
        dst = self.path(rel)
        shutil.copyfile(src, dst)
        return dst

    def write_json(self, rel: str | os.PathLike, obj: Any) -> Path:
        """Write ``obj`` as indented JSON to ``rel`` (e.g. preprocessor_config.json)."""
        dst = self.path(rel)
        dst.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
        return dst

    # ------------------------------------------------------------- manifest
    def add_artifact(self, part: Any, format: Any, precision: Any, file: str,
                     inputs: Iterable[TensorSpec | Mapping[str, Any]] = (),
                     outputs: Iterable[TensorSpec | Mapping[str, Any]] = (),
                     data_files: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> None:
        """Declare an artifact; its file (and data files) must exist when the block ends."""
        part, format, precision = _name(part, "part"), _name(format, "format"), _name(precision, "precision")
        key = (part, format, precision)
        if any((a["part"], a["format"], a["precision"]) == key for a in self._artifacts):
            raise BundleError(f"artifact {' '.join(key)} was added twice; add each part/format/precision once")
        files = [file, *(d["file"] if isinstance(d, Mapping) else d for d in data_files)]
        for f in files:
            _resolve(self.root, f, f"artifact {' '.join(key)}", _HINT_RELATIVE)
        files = [PurePosixPath(f).as_posix() for f in files]  # "./a.onnx" -> "a.onnx", as in `files`
        self._artifacts.append({
            "part": part, "format": format, "precision": precision, "file": files[0], "data_files": files[1:],
            "inputs": [_spec(t) for t in inputs], "outputs": [_spec(t) for t in outputs],
            "extra": _to_json_value(dict(extra or {}), f"{' '.join(key)} extra"),
        })

    def set_section(self, name: str, value: Any) -> None:
        """Set a manifest section (see ``SECTIONS``); ``tool_versions`` merges over the detected ones."""
        if name not in SECTIONS:
            raise BundleError(f"unknown manifest section {name!r}; choose one of {list(SECTIONS)}")
        value = _to_json_value(value, name)
        if name == "semantics_deviations":
            if not isinstance(value, list):
                raise BundleError("semantics_deviations must be a list of warnings")
            self._deviations = value
        else:
            self._sections[name] = value

    def add_semantics_deviation(self, warning: str | Mapping[str, Any]) -> None:
        """Record that an artifact cannot reproduce the model's semantics (e.g. GGUF of hf_cogvlm)."""
        self._deviations.append(_to_json_value(warning, "semantics_deviations"))

    # ------------------------------------------------------------- finalize
    def _finalize(self) -> None:
        root = self.root
        hashes: dict[str, tuple[str, int]] = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise BundleError(f"{rel} is a symlink; a bundle holds plain files, copy the target instead")
            if p.is_file() and rel not in RESERVED:
                hashes[rel] = (file_sha256(p), p.stat().st_size)

        artifacts = []
        for a in self._artifacts:
            def entry(rel: str) -> tuple[str, int]:
                if rel not in hashes:
                    raise BundleError(f"artifact {a['part']} {a['format']} {a['precision']}: {rel} was never "
                                      f"written into the bundle; write it before the `with` block ends")
                return hashes[rel]

            sha, size = entry(a["file"])
            data = [{"file": f, "sha256": entry(f)[0], "size_bytes": entry(f)[1]} for f in a["data_files"]]
            artifacts.append(Artifact(part=a["part"], format=a["format"], precision=a["precision"],
                                      file=a["file"], sha256=sha, size_bytes=size, data_files=data,
                                      inputs=a["inputs"], outputs=a["outputs"], extra=a["extra"]).to_dict())

        manifest: dict[str, Any] = {"kind": KIND, "schema_version": SCHEMA_VERSION}
        for name in SECTIONS:
            if name == "semantics_deviations":
                manifest[name] = list(self._deviations)
            elif name == "tool_versions":
                manifest[name] = {**tool_versions(), **(self._sections.get(name) or {})}
            else:
                manifest[name] = self._sections.get(name)
        manifest["artifacts"] = artifacts

        readme = root / README
        readme.write_text(render_model_card(manifest), encoding="utf-8")
        hashes[README] = (file_sha256(readme), readme.stat().st_size)
        manifest["files"] = {rel: hashes[rel][0] for rel in sorted(hashes)}
        manifest["file_sizes"] = {rel: hashes[rel][1] for rel in sorted(hashes)}
        validate_container(manifest, str(self.out_dir / MANIFEST))  # never write what Bundle.open refuses
        with open(root / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        self.manifest = manifest


def _spec(t: TensorSpec | Mapping[str, Any]) -> TensorSpec:
    return t if isinstance(t, TensorSpec) else TensorSpec.from_dict(t)


def _check_replaceable(out: Path) -> None:
    """Only an empty directory or an earlier bundle may be replaced: never a user's other files."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise BundleError(f"{out} exists and is not a directory; choose another output path")
    if not any(out.iterdir()):
        return
    try:
        is_bundle = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        is_bundle = False
    if not is_bundle:
        raise BundleError(f"{out} exists and is not a vlmexport bundle; choose another output path or remove it")


# ------------------------------------------------------------------------ reading
class Bundle:
    """A bundle opened for reading; use :meth:`Bundle.open`."""

    def __init__(self, root: Path, manifest: dict[str, Any], artifacts: list[Artifact]):
        self.root = root
        self.manifest = manifest
        self.artifacts = artifacts

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, artifacts={[a.key for a in self.artifacts]})"

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str = "full") -> "Bundle":
        """Read and check a bundle.

        ``verify``: ``"full"`` checks sizes and sha256 of every listed file, ``"size"``
        sizes only, ``"none"`` neither. Schema, path safety and presence are always checked.
        """
        if verify not in VERIFY_MODES:
            raise BundleError(f"verify={verify!r} is not one of {list(VERIFY_MODES)}")
        root = Path(path)
        mpath = root / MANIFEST
        if not root.is_dir() or not mpath.is_file():
            what = "not a directory" if not root.is_dir() else f"no {MANIFEST}"
            raise BundleError(f"{root} is not a vlmexport bundle ({what}); build one with `vlmexport build`")
        manifest = read_manifest_json(mpath)  # size, depth, NaN limits: bundle.schema
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise BundleError(f"{mpath} is not a vlmexport manifest; build a bundle with `vlmexport build`")
        _check_schema(manifest.get("schema_version"), mpath)
        validate_container(manifest, str(mpath))
        artifacts = _parse_artifacts(manifest, mpath)
        expected = _expected_files(manifest, artifacts, mpath)
        for rel, (sha, size) in expected.items():
            p = _resolve(root, rel, str(mpath))
            if not p.is_file():
                raise BundleError(f"{p} is missing; {_HINT_REBUILD} or copy the whole directory again")
            if verify in ("full", "size") and size is not None and p.stat().st_size != size:
                raise BundleError(f"{p} is truncated or was modified ({p.stat().st_size} bytes, the manifest "
                                  f"says {size}); {_HINT_REBUILD}")
            if verify == "full" and sha is not None and file_sha256(p) != sha:
                raise BundleError(f"{p} is truncated or was modified (sha256 mismatch); {_HINT_REBUILD}")
        return cls(root, manifest, artifacts)

    # ------------------------------------------------------------- queries
    @property
    def schema_version(self) -> int:
        return self.manifest["schema_version"]

    @property
    def files(self) -> dict[str, str]:
        return dict(self.manifest.get("files") or {})

    @property
    def semantics_deviations(self) -> list[Any]:
        return list(self.manifest.get("semantics_deviations") or [])

    def section(self, name: str, default: Any = None) -> Any:
        value = self.manifest.get(name)
        return default if value is None else value

    def file(self, rel: str) -> Path:
        """``root / rel``, refusing a path that is absolute, has ``..`` or resolves outside the bundle."""
        return _resolve(self.root, rel, str(self.root))

    def find(self, part: Any, format: Any = None, precision: Any = None) -> Artifact:
        """The one artifact matching; a clear error listing what exists otherwise."""
        want = {"part": part, "format": format, "precision": precision}
        want = {k: (v.value if isinstance(v, Enum) else v) for k, v in want.items() if v is not None}
        hits = [a for a in self.artifacts if all(getattr(a, k) == v for k, v in want.items())]
        if len(hits) == 1:
            return hits[0]
        asked = " ".join(f"{k}={v}" for k, v in want.items())
        if not hits:
            have = ", ".join(a.key for a in self.artifacts) or "none"
            raise BundleError(f"{self.root} has no artifact with {asked}; it holds: {have}")
        raise BundleError(f"{self.root} has several artifacts with {asked} ({', '.join(a.key for a in hits)}); "
                          f"also give the format and precision")

    def precisions(self, part: Any, format: Any) -> list[str]:
        part = part.value if isinstance(part, Enum) else part
        format = format.value if isinstance(format, Enum) else format
        return [a.precision for a in self.artifacts if a.part == part and a.format == format]


def _check_schema(version: Any, mpath: Path) -> None:
    if isinstance(version, int) and not isinstance(version, bool):
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise BundleError(f"{mpath} was written by a newer vlmexport (schema {version}, this one reads "
                              f"{SCHEMA_VERSION}); upgrade vlmexport")
    raise BundleError(f"{mpath} has an unknown schema_version {version!r} (this vlmexport reads "
                      f"{SCHEMA_VERSION}); {_HINT_REBUILD}")


def _parse_artifacts(manifest: dict[str, Any], mpath: Path) -> list[Artifact]:
    raw = manifest.get("artifacts")
    if not isinstance(raw, list):
        raise BundleError(f"{mpath} has no artifact list; {_HINT_REBUILD}")
    out = []
    for i, d in enumerate(raw):
        try:
            out.append(Artifact.from_dict(d))
        except (KeyError, TypeError, ValueError, AttributeError, BundleError) as exc:
            raise BundleError(f"{mpath}: artifact {i + 1} is malformed ({type(exc).__name__}: {exc}); "
                              f"{_HINT_REBUILD}") from None
    return out


def _expected_files(manifest: dict[str, Any], artifacts: list[Artifact],
                    mpath: Path) -> dict[str, tuple[str | None, int | None]]:
    """rel -> (sha256, size) from the files map and every artifact; they must agree."""
    files, sizes = manifest.get("files", {}), manifest.get("file_sizes", {})
    if not isinstance(files, dict) or not isinstance(sizes, dict):
        raise BundleError(f"{mpath}: 'files' and 'file_sizes' must be maps; {_HINT_REBUILD}")
    expected: dict[str, list] = {}

    def add(rel: Any, sha: Any, size: Any) -> None:
        why = _bad_path(rel)
        if why:  # checked again with symlinks when the file is opened
            raise BundleError(f"{mpath}: path {rel!r} {why}; refusing to use it, {_HINT_REBUILD}")
        cur = expected.setdefault(rel, [None, None])
        for i, v in ((0, sha), (1, size)):
            if v is None:
                continue
            if cur[i] is not None and cur[i] != v:
                raise BundleError(f"{mpath} lists {rel} twice with different {('sha256', 'sizes')[i]}; "
                                  f"{_HINT_REBUILD}")
            cur[i] = v

    for rel, sha in files.items():
        add(rel, sha, None)
    for rel, size in sizes.items():
        add(rel, None, size)
    for a in artifacts:
        add(a.file, a.sha256, a.size_bytes)
        for d in a.data_files:
            add(d["file"], d["sha256"], d["size_bytes"])
    return {rel: (v[0], v[1]) for rel, v in expected.items()}
