"""The connector-kind protocol and its registry (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ...core.errors import ConfigError
from ...core.plugins import import_package_modules

# ``spec`` arguments are models.spec.ConnectorSpec / PartSpecs; not imported, because
# models.spec asks this package for the token count.
ConnectorSpec = PartSpecs = Any


class ConnectorOps(Protocol):
    """What a connector's ONNX graph is written with (the ONNX exporter implements it).

    Values are graph value names (str). ``linear`` reads the weight the spec names for
    ``role`` (and ``role + "_bias"`` when the spec names one); ``out_in`` is the expected
    (out, in) shape, None where either is free.
    """

    def linear(self, x: str, role: str, out_in: tuple[int | None, int | None]) -> str: ...

    def layer_norm(self, x: str, role: str, dim: int, eps: float) -> str: ...

    def activation(self, x: str, name: str) -> str: ...

    def silu(self, x: str) -> str: ...

    def mul(self, a: str, b: str) -> str: ...

    # for kinds that resample (learned queries attending to the features)
    def parameter(self, role: str, shape: tuple[int, ...]) -> str: ...

    def batch_expand(self, param: str, like: str, tail: tuple[int, ...]) -> str: ...

    def concat(self, values: list[str], axis: int) -> str: ...

    def add(self, a: str, b: str) -> str: ...

    def attention(self, q: str, k: str, v: str, num_heads: int, head_dim: int) -> str:
        """Bidirectional multi-head attention on [B, S, heads * head_dim] values (softmax in float32)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One mmproj tensor: gguf-py ``MODEL_TENSOR`` member name, source tensor (a spec weight
    role, or ``@boi`` / ``@eoi``), block id and name suffix."""

    key: str
    role: str
    bid: int | None = None
    suffix: str = ".weight"


@dataclass(frozen=True)
class GGUFProjector:
    """How llama.cpp's libmtmd runs a connector kind (tools/mtmd/clip.cpp and models/*.cpp)."""

    projector_type: str  # clip.projector_type
    norm_placement: str  # the ViT block form of that projector's graph ("pre" | "post")
    cls_last: bool  # llama.cpp's ViT for this projector appends CLS after the patches
    # write no CLS token (and no CLS position row), so that the graph's patch selection keeps the
    # patches in order; the ViT then runs without CLS (a recorded, measured deviation)
    drop_cls: bool = False
    reads_last_layer_only: bool = False  # the projector's graph reads the last ViT layer, whatever the config
    # the graph reads clip.vision.feature_layer: written always, and only the ViT blocks up to the deepest
    explicit_feature_layers: bool = False
    # llama.cpp swaps ffn_up/ffn_down of a ViT block whose MLP is square (is_ffn_swapped in clip.cpp):
    # such files are written in the legacy naming, which the swap undoes
    legacy_square_ffn: bool = False
    activations: tuple[str, ...] = ()  # connector activations its graph can run; () = any
    known_issue: str = ""  # what llama.cpp runs instead of the model, when it cannot run the model


def _overrides(cls: type, hook: str) -> bool:
    """Whether ``cls`` defines ``hook`` itself (the base class only declares it)."""
    return hasattr(cls, hook) and getattr(cls, hook) is not getattr(ConnectorKind, hook, None)


class ConnectorKind:
    """Base class of a connector kind; subclasses set ``name`` and implement the hooks."""

    name: ClassVar[str]
    gguf: ClassVar[GGUFProjector | None] = None
    gguf_refusal: ClassVar[str] = ""  # why llama.cpp cannot run this kind (when ``gguf`` is None)

    _HOOKS = ("name", "onnx", "gguf_tensors")  # what every kind writes itself

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not hasattr(cls, "name"):
            raise TypeError(f"connector kind {cls.__name__} lacks {[h for h in cls._HOOKS if not _overrides(cls, h)]}")
        if cls.gguf is None and not cls.gguf_refusal:
            raise TypeError(f"connector kind {cls.__name__}: set gguf, or gguf_refusal saying why llama.cpp cannot run it")
        missing = [h for h in cls._HOOKS if not _overrides(cls, h)]
        if missing:
            raise TypeError(f"connector kind {cls.__name__} lacks {missing}")

    # ------------------------------------------------------------------ tokens
    @staticmethod
    def patch_tokens(spec: ConnectorSpec, vision_tokens: int) -> int:
        """Embeddings the connector makes from ``vision_tokens`` ViT outputs (boi/eoi not counted):
        one per ViT output by default; a kind that pools or resamples overrides it."""
        return vision_tokens

    @staticmethod
    def output_width(spec: ConnectorSpec, hidden_size: int) -> int:
        """Width of each output row: the decoder's hidden size by default (spliced embeddings)."""
        return hidden_size

    @staticmethod
    def fixed_tokens(spec: ConnectorSpec) -> int | None:
        """Rows per image when they do not depend on the ViT's token count (a resampler), else None."""
        return None

    @classmethod
    def output_tokens(cls, spec: ConnectorSpec, vision_tokens: int) -> int:
        """Embeddings one image becomes: the projected patches plus boi and eoi where the spec names them."""
        return cls.patch_tokens(spec, vision_tokens) + int(spec.boi is not None) + int(spec.eoi is not None)

    # ------------------------------------------------------------------ graphs
    @staticmethod
    def onnx(ops: ConnectorOps, spec: ConnectorSpec, features: str, vision_width: int, hidden_size: int) -> str:
        """Write the projection of ``features`` [images, T, vision_width] -> [images, T', hidden_size]."""
        raise NotImplementedError

    @staticmethod
    def gguf_tensors(spec: ConnectorSpec) -> list[GGUFTensor]:
        """The connector's mmproj tensors in llama.cpp's names (only for kinds with ``gguf``)."""
        raise NotImplementedError

    @classmethod
    def check_gguf(cls, specs: PartSpecs) -> GGUFProjector:
        """The projector that runs this model in llama.cpp, or a one-line ConfigError saying why none does."""
        v, c = specs.vision, specs.connector
        proj = cls.gguf
        if proj is None:
            raise ConfigError(f"GGUF export: {cls.gguf_refusal}; build --format onnx instead")
        if v.norm_placement != proj.norm_placement:
            raise ConfigError(f"llama.cpp's {proj.projector_type} projector runs {proj.norm_placement}-norm ViT "
                              f"blocks, this model's are {v.norm_placement}-norm; it cannot be exported to GGUF")
        if v.keep_cls:
            raise ConfigError("llama.cpp's projectors drop the CLS token; a model that keeps it "
                              "(vision_feature_select_strategy='full') cannot be exported to GGUF")
        if v.activation not in ("gelu", "quick_gelu", "silu"):
            raise ConfigError(f"llama.cpp's ViT runs gelu, quick_gelu or silu; this model's is {v.activation!r}")
        if proj.reads_last_layer_only and tuple(v.feature_layers) not in ((), (v.num_layers,)):
            raise ConfigError(f"llama.cpp's {proj.projector_type} projector reads the last ViT layer; this model "
                              f"reads {list(v.feature_layers)}")
        if proj.explicit_feature_layers and list(v.feature_layers) != sorted(set(v.feature_layers)):
            raise ConfigError(f"llama.cpp stacks the ViT feature layers in increasing order; this model reads "
                              f"{list(v.feature_layers)} (unsorted or repeated), so it cannot be exported to GGUF")
        if proj.activations and c.activation not in proj.activations:
            raise ConfigError(f"llama.cpp's {proj.projector_type} projector applies {'/'.join(proj.activations)}; "
                              f"this model's projector uses {c.activation!r}")
        return proj


_KINDS: dict[str, type[ConnectorKind]] = {}


def register_connector(cls: type[ConnectorKind]) -> type[ConnectorKind]:
    """Class decorator: make a connector kind available by its ``name``."""
    if cls.name in _KINDS and _KINDS[cls.name] is not cls:
        raise RuntimeError(f"connector kind {cls.name!r} is registered twice")
    _KINDS[cls.name] = cls
    return cls


def connector_kinds() -> dict[str, type[ConnectorKind]]:
    """Every registered kind (each file of this package registers its own, found on disk)."""
    import_package_modules(__package__)
    return dict(_KINDS)


def get_connector(kind: str) -> type[ConnectorKind]:
    kinds = connector_kinds()
    if kind not in kinds:
        raise ConfigError(f"unknown connector kind {kind!r}; known kinds: {sorted(kinds)}")
    return kinds[kind]
