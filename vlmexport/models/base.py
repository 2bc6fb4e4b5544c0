"""The model family: configs, parts, the registry and the shared VLM base class.

An architecture is one file in this package that subclasses :class:`VLM` and is
registered with :func:`register`. Everything a pipeline needs to know about it (its
config, the checkpoint tensor names, how images become embeddings, which GGUF
architecture it maps to) hangs off that class, so no pipeline, CLI or backend ever
tests an architecture name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..core.errors import ConfigError
from ..core.layout import ExpertRouting, PositionIds
from ..core.names import Part  # noqa: F401  (re-exported: models.Part)
from ..core.plugins import import_package_modules
from ..core.preprocess import PreprocessConfig
from ..core.prompt import ChatTemplate
from .layers import CrossAttention, KVCache, Route, rope_cos_sin, rope_inv_freq


# ---------------------------------------------------------------------------- configs
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    in_channels: int = 3

    def __post_init__(self) -> None:
        _check(self.image_size % self.patch_size == 0,
               f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # + CLS


@dataclass
class VLMConfig:
    """Fields every architecture shares: the LLaMA text decoder plus the semantics."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    expert_routing: str = ExpertRouting.IMAGE_CHUNK.value
    position_ids: str = PositionIds.SEQUENTIAL.value

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            known = {f.name for f in dataclasses.fields(VisionConfig)}
            self.vision_config = VisionConfig(**{k: v for k, v in self.vision_config.items() if k in known})
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               "num_attention_heads must be a multiple of num_key_value_heads")
        _check(self.head_dim % 2 == 0, "the attention head size must be even for RoPE")
        try:
            ExpertRouting(self.expert_routing)
            PositionIds(self.position_ids)
        except ValueError:
            raise ConfigError(
                f"expert_routing must be one of {[e.value for e in ExpertRouting]} and position_ids one of "
                f"{[e.value for e in PositionIds]}; got {self.expert_routing!r} / {self.position_ids!r}"
            ) from None
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            _check(getattr(self, name) > 0, f"{name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------- the registry
_REGISTRY: dict[str, type["VLM"]] = {}


def register(cls: type["VLM"]) -> type["VLM"]:
    """Class decorator: make an architecture available by its ``arch_name``."""
    name = cls.arch_name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise RuntimeError(f"architecture {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


def architectures() -> dict[str, type["VLM"]]:
    """Every registered architecture. The modules of this package are imported once (found
    on disk, not listed), so adding an architecture is adding a file with ``@register``."""
    import_package_modules(__package__)
    return dict(_REGISTRY)


def get_architecture(name: str) -> type["VLM"]:
    archs = architectures()
    if name not in archs:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {sorted(archs)}")
    return archs[name]


def architecture_for_hf(hf_config: dict[str, Any], source: str = "config.json") -> type["VLM"]:
    """Pick the architecture that reads a Hugging Face ``config.json``."""
    names = list(hf_config.get("architectures") or [])
    for cls in architectures().values():
        if any(n in cls.hf_architectures for n in names):
            return cls
    known = sorted(n for c in architectures().values() for n in c.hf_architectures)
    raise ConfigError(
        f"{source}: architectures {names or '(missing)'} is not supported; vlmexport reads {known}"
    )


# --------------------------------------------------------------------- the base class
_REQUIRED_HOOKS = (
    "arch_name", "hf_architectures", "config_class", "gguf_arch",
    "config_from_hf", "config_to_hf", "tiny_config",
    "encode_images", "token_embedding", "decoder_layers", "final_norm", "lm_head_module",
    "vision_encoder_module", "connector_module", "reset_special_parameters", "part_specs",
)


class VLM(nn.Module):
    """A vision-language model: vision encoder -> connector -> (expert) LLaMA decoder.

    Subclasses lay out submodules under their checkpoint's tensor names and implement
    the hooks in ``_REQUIRED_HOOKS``; a subclass that misses one fails at import.
    """

    arch_name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[VLMConfig]]
    gguf_arch: ClassVar[str]
    has_experts: ClassVar[bool] = False
    # "splice": image embeddings take positions in the sequence; "cross_attend": the decoder attends to
    # them (core.layout.ImagePlacement), its part spec's decoder.cross_attention says how
    image_placement: ClassVar[str] = "splice"
    # checkpoint spellings -> our names (one alias per entry; see checkpoint.py)
    checkpoint_aliases: ClassVar[tuple[tuple[str, str], ...]] = ()
    checkpoint_ignored: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        missing = [h for h in _REQUIRED_HOOKS if not hasattr(cls, h)]
        if missing:
            raise TypeError(f"architecture class {cls.__name__} is missing {missing}")

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.register_buffer("rope_inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)

    # ----------------------------------------------------------------- config hooks
    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> VLMConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def config_to_hf(cls, config: VLMConfig) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -------------------------------------------------------------------- parts
    def parts(self) -> dict[Part, nn.Module]:
        """The exportable parts as modules sharing this model's parameters."""
        return {
            Part.VISION_ENCODER: self.vision_encoder_module(),
            Part.CONNECTOR: self.connector_module(),
            Part.TOKEN_EMBEDDING: self.token_embedding(),
            Part.TEXT_DECODER: TextDecoder(self),
        }

    def image_tokens(self) -> int:
        """Embeddings one image becomes: the part spec's count (its connector kind's), nowhere else."""
        return self.part_specs(self.config).image_tokens

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, image_tokens, hidden]: vision encoder then connector."""
        return self.encode_images(pixel_values)

    def image_placeholder_id(self) -> int:
        """The token id an image's positions hold in the sequence (spliced over, or embedded as text)."""
        x = self.part_specs(self.config).decoder.cross_attention
        return self.config.pad_token_id if x is None else x.placeholder_id

    def cross_attention(self, image_embeds: torch.Tensor | None, media: torch.Tensor) -> CrossAttention:
        """What a cross-attending decoder reads: ``image_embeds`` [N, T, W] (every image of the batch in
        order; ``media`` [B, S] indexes them, -1: none), or None when there is no image."""
        x = self.part_specs(self.config).decoder.cross_attention
        if x is None:
            raise TypeError(f"{type(self).__name__} splices images into its sequence; it has no cross-attention")
        if image_embeds is None:
            p = self.lm_head_module().weight
            image_embeds = torch.zeros(1, x.memory_tokens, x.memory_width, dtype=p.dtype, device=media.device)
            media = torch.full_like(media, -1)
        elif media.numel() and int(media.max()) >= image_embeds.shape[0]:
            raise ValueError(f"the prompt has image positions for {int(media.max()) + 1} images but "
                             f"{image_embeds.shape[0]} image embeddings were given")
        return CrossAttention(image_embeds.reshape(1, -1, x.memory_width), media, x.memory_tokens)

    def media_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] -> the image each position attends to (-1: none), numbering the images of the whole
        batch in order (as ``pixel_values`` holds them): each row's placeholder tokens counted, the
        rows before it offset (what ``SequenceLayout.media`` holds for one prompt)."""
        is_ph = (input_ids == self.image_placeholder_id()).long()
        per_row = is_ph.sum(1)
        offset = torch.cumsum(per_row, 0) - per_row
        media = torch.cumsum(is_ph, 1) - 1 + offset[:, None]
        return torch.where(torch.cumsum(is_ph, 1) > 0, media, torch.full_like(media, -1))

    def decoder_inputs(self, input_ids: torch.Tensor, is_image: torch.Tensor | None = None,
                       image_embeds: torch.Tensor | None = None, media: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, CrossAttention | None]:
        """What ``decode`` takes for a batch, whatever the image placement: (embeddings, cross). Spliced:
        the image embeddings scattered into the ``is_image`` positions, no cross input. Cross-attended:
        the token embeddings (placeholders included) and the images as memory, ``media`` (default: from
        the placeholder tokens, :meth:`media_of`) saying which one each position reads."""
        if self.image_placement == "splice":
            return self.embed(input_ids, is_image, image_embeds), None
        if media is None:
            media = self.media_of(input_ids)
        return self.embed(input_ids), self.cross_attention(image_embeds, media)

    # ------------------------------------------------------------------- decoding
    def embed(self, input_ids: torch.Tensor, is_image: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image chunks scattered into the ``is_image`` positions."""
        emb = self.token_embedding()(input_ids)
        if image_embeds is not None and is_image is not None:
            flat = image_embeds.reshape(-1, emb.shape[-1]).to(emb.dtype)
            n = int(is_image.sum())
            if n != flat.shape[0]:
                raise ValueError(f"prompt has {n} image positions but {flat.shape[0]} image embeddings were given")
            emb = emb.masked_scatter(is_image[..., None], flat)
        return emb

    def decode(self, inputs_embeds: torch.Tensor, token_type: torch.Tensor | None,
               position_ids: torch.Tensor, cache: KVCache | None = None, start: int | torch.Tensor = 0,
               last_only: bool = False, select: torch.Tensor | None = None,
               cross: CrossAttention | None = None) -> torch.Tensor:
        """Run the text decoder on embeddings -> logits [B, S or 1, vocab].

        ``cross``: the images a cross-attending decoder reads (``image_placement == "cross_attend"``,
        which overrides this method); a splicing decoder takes none.

        ``select`` (flat indices into B*S) computes logits only at those positions ->
        [len(select), vocab]; training uses it to skip the LM head on unsupervised tokens.
        ``start`` a 0-d tensor runs a static-shape step over the whole cache (see
        ``KVCache.update``); the caller then keeps ``cache.length``.
        """
        if cross is not None:
            raise TypeError(f"{type(self).__name__} splices images into its sequence; it takes no cross-attention")
        route = Route.from_token_type(token_type) if self.has_experts else None
        cos, sin = rope_cos_sin(position_ids, self.rope_inv_freq, inputs_embeds.dtype)
        h = inputs_embeds
        ckpt = self.gradient_checkpointing and self.training and cache is None
        for i, layer in enumerate(self.decoder_layers()):
            if ckpt:
                h = activation_checkpoint(layer, h, cos, sin, route, None, i, 0, use_reentrant=False)
            else:
                h = layer(h, cos, sin, route, cache, i, start)
        if cache is not None and isinstance(start, int):  # a static step's caller keeps the length
            cache.length = start + inputs_embeds.shape[1]
        if last_only:
            h = h[:, -1:]
        elif select is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, select)
        return self.lm_head_module()(self.final_norm()(h))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type: torch.Tensor | None = None, is_image: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, media: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence forward (training / reference): logits [B, S, vocab]. ``media``: see
        :meth:`decoder_inputs` (cross-attending decoders only)."""
        image_embeds = self.image_embeddings(pixel_values) if pixel_values is not None else None
        emb, cross = self.decoder_inputs(input_ids, is_image, image_embeds, media)
        return self.decode(emb, token_type, position_ids, cross=cross)

    def new_cache(self, batch: int = 1, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len or c.max_position_embeddings,
                       c.head_dim, dtype=dtype or self.lm_head_module().weight.dtype,
                       device=device or self.lm_head_module().weight.device)

    # --------------------------------------------------------------- bookkeeping
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def named_parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names grouped by role (for freezing in training stages)."""
        groups: dict[str, list[str]] = {"vision": [], "connector": [], "language": [], "visual_expert": [],
                                        "embedding": [], "other": []}
        for name, _ in self.named_parameters():  # an architecture may name finer roles of its own
            groups.setdefault(self.parameter_role(name), []).append(name)
        return groups

    def parameter_role(self, name: str) -> str:  # pragma: no cover - overridden
        return "other"

    def iter_visual_expert_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(language module, visual-expert module) pairs of identical shape."""
        return iter(())

    @classmethod
    def default_preprocess(cls, config: VLMConfig) -> PreprocessConfig | None:
        """The image transform when a checkpoint ships no image-processor file (None: required)."""
        return None

    @classmethod
    def default_chat_template(cls, config: VLMConfig | None = None) -> ChatTemplate:
        """The family's chat template (jinja, as transformers renders it), used when a model
        directory brings none; every architecture defines its own."""
        raise NotImplementedError(f"{cls.__name__} defines no chat template")


class TextDecoder(nn.Module):
    """The ``text_decoder`` part: embeddings + routing + positions -> logits."""

    def __init__(self, model: VLM):
        super().__init__()
        object.__setattr__(self, "model", model)  # share, do not re-register parameters
        self.layers = nn.ModuleList(model.decoder_layers())
        self.norm = model.final_norm()
        self.lm_head = model.lm_head_module()

    def forward(self, inputs_embeds, token_type, position_ids, cache=None, start=0, last_only=False, cross=None):
        kw = {} if cross is None else {"cross": cross}
        return self.model.decode(inputs_embeds, token_type, position_ids, cache, start, last_only, **kw)


def estimate_parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def seeded_init(model: VLM, seed: int, std: float = 0.02) -> VLM:
    """Deterministic random initialisation (tests and from-scratch training)."""
    from .layers import init_weights

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        init_weights(model, std)
        model.reset_special_parameters()
    finally:
        torch.random.set_rng_state(gen_state)
    return model
