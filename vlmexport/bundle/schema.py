"""The one schema of ``manifest.json``, checked before anything is allocated from it.

A bundle is copied between machines and edited by people, and ``manifest.json`` is the
one file its hashes cannot cover. Every number a runtime sizes a buffer with (context
length, image tokens, layers, heads, vocabulary) therefore comes from here, validated by
pydantic (strict types: no bool for an int, no string for a number, no NaN), inside
bounds that follow from the model itself:

* **container** (:func:`validate_container`, on every :meth:`Bundle.open`): kind,
  schema version, artifact entries (names, sha256, sizes, tensor specs), the files maps
  and the sections' types, plus a depth and size limit on the JSON itself;
* **runtime** (:func:`validate_runtime`, before a backend is built and by ``inspect``):
  the ``model``, ``tokenizer``, ``preprocessing`` and ``chat_template`` sections a
  runtime reads, with cross-checks against the artifacts, whose files are hashed:

  - ``vocab_size x hidden_size`` is the shape of the stored token-embedding table;
  - ``image_tokens`` is at most the vision encoder's output tokens + 2 (boi/eoi) and
    leaves room for text in the context;
  - ``num_layers``, ``hidden_size``, ``intermediate_size`` and the heads fit the
    decoder's weights: every layer holds at least its attention and MLP matrices, at
    2 bits per weight at the least (below every quantization we write), so a layer count
    or width the stored decoder cannot hold is refused;
  - ``max_length`` is capped (:data:`MAX_CONTEXT`), agrees with the checkpoint's
    ``max_position_embeddings`` when the manifest carries it, and its KV cache
    (:func:`kv_cache_bytes`) must fit this machine's memory (:func:`check_memory`).

Every failure is one :class:`~vlmexport.bundle.BundleError` line naming the field and
what to do. This module imports the standard library, pydantic and ``vlmexport.core``
only (the runtime image installs no more).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from ..core.errors import BundleError

HINT_REBUILD = "rebuild the bundle with `vlmexport build`"

# ------------------------------------------------------------------ absolute bounds
# Generous for any model this project can export (Llama-3-405B: 126 layers, 16384 wide,
# 128k vocab, 128k context), small enough that no single field can request terabytes.
MAX_MANIFEST_BYTES = 16 << 20  # real manifests are ~30 kB; the hf_config copy is the largest part
MAX_JSON_DEPTH = 64
MAX_CONTEXT = 1 << 20  # tokens
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 16  # hidden / intermediate / head sizes
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_IMAGE_SIDE = 8192  # core.preprocess.MAX_IMAGE_PIXELS is 64M pixels (8000 x 8000)
MAX_FILE_BYTES = 1 << 44  # 16 TiB
MAX_NAME = 128
MAX_PATH = 1024
MAX_TEXT = 4096  # template strings
MAX_LIST = 100_000  # files, artifacts, data files
MIN_BITS_PER_WEIGHT = 2  # below every quantization vlmexport writes (q4_k_m 4.8, int4 4.1, q4_0 4.5)
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1}

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9_.+-]+$")]
RelPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Size = Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]
Dim = Annotated[int, Field(ge=0, le=1 << 40)]
AxisName = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
TokenId = Annotated[int, Field(ge=0, lt=MAX_VOCAB)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


BundleSchemaError = BundleError  # one class: ``vlmexport.bundle.BundleError`` is this one


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True, allow_inf_nan=False)


# ------------------------------------------------------------------ container
class TensorSpecModel(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME * 2)]
    dtype: Literal[tuple(DTYPE_BYTES)]  # type: ignore[valid-type]
    shape: Annotated[list[Union[Dim, AxisName]], Field(max_length=16)]


class DataFileModel(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    file: RelPath
    sha256: Sha256
    size_bytes: Size


class ArtifactModel(_Strict):
    part: Name
    format: Name
    precision: Name
    file: RelPath
    sha256: Sha256
    size_bytes: Size
    data_files: Annotated[list[DataFileModel], Field(max_length=MAX_LIST)] = []
    inputs: Annotated[list[TensorSpecModel], Field(max_length=1024)] = []
    outputs: Annotated[list[TensorSpecModel], Field(max_length=1024)] = []
    extra: dict[str, Any] = {}

    @property
    def total_size_bytes(self) -> int:
        return self.size_bytes + sum(d.size_bytes for d in self.data_files)


class ContainerManifest(_Strict):
    """What every bundle holds, whatever wrote it (checked by ``Bundle.open``)."""

    kind: Literal["vlmexport-bundle"]
    schema_version: int
    artifacts: Annotated[list[ArtifactModel], Field(max_length=MAX_LIST)]
    files: Annotated[dict[RelPath, Sha256], Field(max_length=MAX_LIST)] = {}
    file_sizes: Annotated[dict[RelPath, Size], Field(max_length=MAX_LIST)] = {}
    model: Optional[dict[str, Any]] = None
    tokenizer: Optional[dict[str, Any]] = None
    preprocessing: Optional[dict[str, Any]] = None
    chat_template: Optional[dict[str, Any]] = None
    # display-only sections (no buffer is sized from them): their type, and the JSON limits
    semantics_deviations: Optional[list[Any]] = None
    calibration: Optional[dict[str, Any]] = None
    validation: Optional[dict[str, Any]] = None
    benchmarks: Optional[dict[str, Any]] = None
    tool_versions: Optional[dict[str, Any]] = None


# ------------------------------------------------------------------ runtime sections
class ModelSection(_Strict):
    arch: Name
    image_tokens: Annotated[int, Field(ge=1, le=MAX_CONTEXT)]
    image_size: Annotated[int, Field(ge=2, le=MAX_IMAGE_SIDE)]
    expert_routing: Literal["image_chunk", "hf_cogvlm"]
    position_ids: Literal["sequential", "hf_cogvlm"]
    hidden_size: Annotated[int, Field(ge=1, le=MAX_WIDTH)]
    intermediate_size: Annotated[int, Field(ge=1, le=4 * MAX_WIDTH)]
    num_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    num_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    num_kv_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    head_dim: Annotated[int, Field(ge=2, le=MAX_WIDTH)]
    vocab_size: Annotated[int, Field(ge=2, le=MAX_VOCAB)]
    max_length: Annotated[int, Field(ge=2, le=MAX_CONTEXT)]
    has_experts: bool = False
    bos_token_id: Optional[TokenId] = None
    eos_token_id: Optional[TokenId] = None
    pad_token_id: TokenId
    gguf_arch: Optional[Name] = None
    num_parameters: Optional[Annotated[int, Field(ge=0, le=1 << 44)]] = None
    hf_config: Optional[dict[str, Any]] = None
    image_placement: Literal["splice", "cross_attend"] = "splice"  # cross_attend: image_tokens are placeholders
    image_token_id: Optional[TokenId] = None  # what an image's positions hold (default pad_token_id)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSection":
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id"):
            v = getattr(self, name)
            if v is not None and v >= self.vocab_size:
                raise ValueError(f"{name} {v} is outside the vocabulary of {self.vocab_size}")
        if self.image_tokens >= self.max_length:
            raise ValueError(f"image_tokens {self.image_tokens} leaves no room for text in a context of "
                             f"{self.max_length}")
        hf_ctx = (self.hf_config or {}).get("max_position_embeddings")
        if isinstance(hf_ctx, int) and not isinstance(hf_ctx, bool) and hf_ctx != self.max_length:
            raise ValueError(f"max_length {self.max_length} differs from the checkpoint's max_position_embeddings "
                             f"{hf_ctx}")
        return self


class TokenizerSection(_Strict):
    file: RelPath
    vocab_size: Optional[Annotated[int, Field(ge=2, le=MAX_VOCAB)]] = None
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None


Float3 = Annotated[list[float], Field(min_length=3, max_length=3)]


class PreprocessingSection(_Strict):
    file: RelPath
    image_size: Annotated[int, Field(ge=2, le=MAX_IMAGE_SIDE)]
    image_mean: Float3
    image_std: Float3
    resample: Literal["nearest", "lanczos", "bilinear", "bicubic", "box", "hamming"]
    resize_mode: Literal["squash", "shortest_edge_center_crop"]

    @field_validator("image_mean", "image_std", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:  # a JSON int is a fine float here
        if isinstance(v, list):
            return [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("image_std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not (1e-6 <= x <= 1e6) for x in v):
            raise ValueError("every image_std must be in [1e-6, 1e6] (it divides the pixels)")
        return v


def _only_content_field(v: str) -> str:
    fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
    if fields != ["content"]:
        raise ValueError(f"must hold the one placeholder {{content}} and no other braces, got fields {fields}")
    return v


class ChatTemplateSection(_Strict):
    user: Text
    assistant: Text
    turn_separator: Text = "\n"
    add_bos: bool = True
    eos_after_answer: bool = True
    unplaced_images: Literal["start", "error"] = "start"
    image_token: Annotated[str, Field(min_length=1, max_length=64)] = "<image>"

    @field_validator("user", "assistant")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            return _only_content_field(v)
        except ValueError as exc:  # string.Formatter raises ValueError on a lone brace too
            raise ValueError(str(exc) if "placeholder" in str(exc) else f"is not a format string ({exc})") from None


class JinjaTemplateSection(_Strict):
    """The chat template of bundles since the jinja templates: its settings here, the text in a
    ``.jinja`` file of the bundle (compiled in a sandbox when the runtime reads it)."""

    file: RelPath
    image_token: Annotated[str, Field(min_length=1, max_length=64)] = "<image>"
    content_format: Literal["list", "string", ""] = ""
    encode_runs_apart: bool = False
    source: Annotated[str, Field(max_length=4096)] = ""

    @field_validator("file")
    @classmethod
    def _jinja_file(cls, v: str) -> str:
        if not v.endswith(".jinja"):
            raise ValueError("must name the bundle's .jinja template file")
        return v


def _template_kind(v: Any) -> str:
    return "format_string" if isinstance(v, ChatTemplateSection) or (isinstance(v, dict) and "user" in v) else "jinja"


class RuntimeManifest(_Strict):
    """The sections a runtime reads, typed (checked by :func:`validate_runtime`)."""

    model: ModelSection
    tokenizer: TokenizerSection
    preprocessing: PreprocessingSection
    # a bundle's jinja template, or the format-string template older bundles hold (it has ``user``)
    chat_template: Annotated[Union[Annotated[ChatTemplateSection, Tag("format_string")],
                                   Annotated[JinjaTemplateSection, Tag("jinja")]], Discriminator(_template_kind)]

    @model_validator(mode="after")
    def _agree(self) -> "RuntimeManifest":
        if self.preprocessing.image_size != self.model.image_size:
            raise ValueError(f"preprocessing.image_size {self.preprocessing.image_size} differs from "
                             f"model.image_size {self.model.image_size}")
        if self.tokenizer.vocab_size is not None and self.tokenizer.vocab_size > self.model.vocab_size:
            raise ValueError(f"the tokenizer's {self.tokenizer.vocab_size} pieces do not fit the model's vocabulary "
                             f"of {self.model.vocab_size}")
        return self


# ------------------------------------------------------------------ reading
def _one_line(exc: ValidationError, source: str) -> str:
    errs = exc.errors(include_url=False)
    e = errs[0]
    loc = list(e["loc"])
    if len(loc) >= 2 and loc[0] == "artifacts" and isinstance(loc[1], int):  # name the entry as people count
        loc = [f"artifact {loc[1] + 1} is malformed:", ".".join(str(x) for x in loc[2:])]
        where = " ".join(str(x) for x in loc if x != "")
    else:
        where = ".".join(str(x) for x in loc) or "manifest"
    got = repr(e.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    msg = e["msg"].removeprefix("Value error, ")
    where_got = "" if e["type"] in ("value_error", "missing") else f" (got {got})"
    return f"{source}: {where}: {msg}{where_got}{more}; {HINT_REBUILD}"


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_manifest_json(path: str | os.PathLike) -> Any:
    """``json.loads`` of ``manifest.json`` with a size limit, a depth limit and no NaN/Infinity.

    Raises :class:`BundleSchemaError` (one line)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleSchemaError(f"{p} is {size:,} bytes, more than a manifest holds ({MAX_MANIFEST_BYTES:,}); "
                                    f"{HINT_REBUILD}")
        with open(p, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except BundleSchemaError:
        raise
    except RecursionError:
        raise BundleSchemaError(f"{p} nests deeper than any manifest; {HINT_REBUILD}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, huge int literals, NaN
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BundleSchemaError(f"{p} is not valid JSON ({detail}); {HINT_REBUILD}") from None
    except OSError as exc:
        raise BundleSchemaError(f"{p} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if not json_depth_ok(value):
        raise BundleSchemaError(f"{p} nests deeper than {MAX_JSON_DEPTH} levels; {HINT_REBUILD}")
    return value


def validate_container(manifest: Any, source: str) -> ContainerManifest:
    """The container schema (kind, artifacts, files, section types) or one BundleSchemaError line."""
    if not isinstance(manifest, dict):
        raise BundleSchemaError(f"{source} is not a vlmexport manifest (not a JSON object); build a bundle with "
                                "`vlmexport build`")
    try:
        return ContainerManifest.model_validate(manifest)
    except ValidationError as exc:
        raise BundleSchemaError(_one_line(exc, source)) from None


def validate_runtime(manifest: Mapping[str, Any], artifacts: Sequence[Any], source: str) -> RuntimeManifest:
    """The runtime sections, typed and bounded, checked against the (hashed) artifacts.

    ``artifacts``: objects with ``part``, ``format``, ``precision``, ``outputs`` (tensor
    specs with ``shape``/``dtype``) and ``total_size_bytes``, e.g. ``Bundle.artifacts``."""
    missing = [s for s in ("model", "tokenizer", "preprocessing", "chat_template") if not manifest.get(s)]
    if missing:
        raise BundleSchemaError(f"{source} has no {', '.join(missing)} section(s), which a runtime needs; "
                                f"{HINT_REBUILD}")
    try:
        rt = RuntimeManifest.model_validate({k: manifest[k] for k in ("model", "tokenizer", "preprocessing",
                                                                      "chat_template")})
    except ValidationError as exc:
        raise BundleSchemaError(_one_line(exc, source)) from None
    why = _against_artifacts(rt.model, artifacts)
    if why:
        raise BundleSchemaError(f"{source}: {why}; the manifest was edited or does not belong to these files: "
                                f"{HINT_REBUILD}")
    return rt


def _static(shape: Sequence[Any], i: int) -> int | None:
    v = shape[i] if -len(shape) <= i < len(shape) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def decoder_min_bytes(m: ModelSection) -> int:
    """The fewest bytes the decoder's layers can be stored in (MIN_BITS_PER_WEIGHT per weight)."""
    h, q, kv = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * m.intermediate_size
    experts = 2 if m.has_experts else 1
    return m.num_layers * per_layer * experts * MIN_BITS_PER_WEIGHT // 8


def _against_artifacts(m: ModelSection, artifacts: Sequence[Any]) -> str | None:
    for a in artifacts:
        outs = list(getattr(a, "outputs", ()) or ())
        if a.part == "token_embedding" and outs:
            shape = list(outs[0].shape)
            if len(shape) == 2 and shape != [m.vocab_size, m.hidden_size]:
                return (f"model says vocab_size {m.vocab_size} x hidden_size {m.hidden_size} but {a.file} holds a "
                        f"{shape[0]} x {shape[1]} embedding table")
        if a.part == "vision_encoder" and outs:
            tokens = _static(list(outs[0].shape), 1)
            if tokens is not None and m.image_tokens > tokens + 2:
                return (f"model.image_tokens {m.image_tokens} is more than the vision encoder's {tokens} output "
                        "tokens + boi/eoi")
    decoders = [a.total_size_bytes for a in artifacts if a.part in ("text_decoder", "model")]
    if decoders and max(decoders) < decoder_min_bytes(m):
        return (f"model says {m.num_layers} layers of width {m.hidden_size} (at least {decoder_min_bytes(m):,} "
                f"bytes of weights) but the largest decoder file holds {max(decoders):,} bytes")
    return None


# ------------------------------------------------------------------ memory
def kv_cache_bytes(m: ModelSection, dtype_bytes: int = 4) -> int:
    """Bytes of a key + value cache over the whole context (what a backend preallocates)."""
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.max_length * dtype_bytes


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def check_memory(m: ModelSection, context: int | None = None, dtype_bytes: int = 4, source: str = "bundle") -> int:
    """The KV-cache bytes at ``context`` (default: the model's), refused when they exceed this
    machine's physical memory (checked before any buffer is allocated)."""
    ctx = m.max_length if context is None else context
    need = kv_cache_bytes(m.model_copy(update={"max_length": ctx}), dtype_bytes)
    have = physical_memory_bytes()
    if have is not None and need > have:
        raise BundleSchemaError(f"{source}: a {ctx:,}-token context needs {need / 1e9:.1f} GB of KV cache but this "
                                f"machine has {have / 1e9:.1f} GB; use a smaller context or a bigger machine")
    return need

