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

    def add(self, a: str, b: str) -> str: ...

    def parameter(self, role: str, shape: tuple[int, ...], like: str) -> str:
        """The learned tensor the spec names for ``role`` (any stored shape with as many elements),
        as [images, *shape]: broadcast over the first axis of ``like``."""
        ...

    def attention(self, q: str, k: str, v: str, num_heads: int, head_dim: int) -> str:
        """Unmasked multi-head attention: q [images, Sq, H*hd] over k, v [images, Sk, H*hd]
        -> [images, Sq, H*hd] (self-attention when k, v come from q's sequence, cross-attention
        when they come from another)."""
        ...

    def reshape(self, x: str, shape: list[int]) -> str: ...  # ONNX Reshape semantics (0 copies, -1 infers)

    def transpose(self, x: str, perm: list[int]) -> str: ...

    def slice(self, x: str, starts: list[int], ends: list[int], axes: list[int]) -> str: ...

    def concat(self, xs: list[str], axis: int) -> str: ...

    def for_spec(self, spec: ConnectorSpec) -> "ConnectorOps": ...  # weights read through another spec


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

    @staticmethod
    def input_tokens(spec: ConnectorSpec) -> int | None:
        """The number of ViT outputs the kind's graph is built for, when it needs a fixed one (a kind
        that folds a patch grid); None: any number (the ONNX token axis stays dynamic)."""
        return None

    @classmethod
    def output_tokens(cls, spec: ConnectorSpec, vision_tokens: int) -> int:
        """Embeddings one image becomes: the projected patches plus boi and eoi where the spec names them."""
        return cls.patch_tokens(spec, vision_tokens) + int(spec.boi is not None) + int(spec.eoi is not None)

    @classmethod
    def output_axis(cls, spec: ConnectorSpec, vision_tokens: int | str) -> int | str:
        """The token axis of the ONNX graph's output for an input axis ``vision_tokens`` (a fixed
        count, or the name of a dynamic axis): fixed where the kind's count does not follow the
        ViT's (``fixed_tokens``: a resampler's learned queries)."""
        if cls.fixed_tokens(spec) is not None:
            return cls.output_tokens(spec, 0)
        if isinstance(vision_tokens, int):
            return cls.output_tokens(spec, vision_tokens)
        return "image_tokens" if spec.boi is not None or spec.eoi is not None else vision_tokens

    # ------------------------------------------------------------------ graphs
    @staticmethod
    def onnx(ops: ConnectorOps, spec: ConnectorSpec, features: str, vision_width: int, hidden_size: int) -> str:
        """Write the projection of ``features`` [images, T, vision_width] -> [images, T', hidden_size]."""
        raise NotImplementedError

    @staticmethod
    def gguf_tensors(spec: ConnectorSpec) -> list[GGUFTensor]:
        """The connector's mmproj tensors in llama.cpp's names (only for kinds with ``gguf``)."""
        raise NotImplementedError

    @staticmethod
    def gguf_metadata(spec: ConnectorSpec) -> dict[str, int]:
        """Extra mmproj keys (llama.cpp key -> uint32) the projector's graph reads; none by default."""
        return {}

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
        if v.post_norm is not None:
            raise ConfigError(f"the GGUF writer has no LayerNorm on the ViT output for llama.cpp's "
                              f"{proj.projector_type} projector; this model has one, so it cannot be exported to GGUF")
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
