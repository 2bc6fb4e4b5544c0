"""``vary``: two vision encoders side by side (Vary's "new vision vocabulary") -> plain LLaMA.

- a CLIP ViT with LLaVA's 2-layer MLP projector: exactly ``llava``'s parts and tensor names
  (``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.*``);
- a SAM-style ViTDet encoder (windowed attention with decomposed relative positions, some
  global blocks, a conv neck; 16x downsampling with SAM's patch 16) under
  ``vision_tower_high.*`` with the module names of transformers' ``GotOcr2VisionEncoder``
  (GOT-OCR2's vision tower, Vary's successor), and its own MLP projector
  ``mm_projector_vary.*`` (Vary's names for the two).

Choices (docs/export.md, "vary"):
- Token order: the CLIP tokens first, then the SAM tokens (Vary's own order when it joins the
  two, ``cat((clip, sam))``). Vary joins them along the channels (both give 256 tokens at its
  sizes); as the issue asks, the tokens are concatenated here, so the two grids may differ.
- Preprocessing: one. Both encoders read the same preprocessed image (the model's
  ``vision_config.image_size``, one mean/std); the SAM encoder has no image size of its own.
  Vary feeds CLIP 224 px and SAM 1024 px with their own normalisations; a checkpoint whose
  ``sam_config.image_size`` differs from the CLIP's is refused with one line.
- Export: one ``vision_encoder`` graph holding both encoders (``ParallelVisionSpec``) whose
  ``image_features`` are the two outputs one after the other (the narrower zero-padded on the
  feature axis), and a ``parallel`` connector that slices each back out for its projector.
  Every runtime, the TensorRT profile and the int8 calibration then see the usual two parts.
- Training: stage 1 aligns the SAM projector alone (``train_roles=("connector_new",)``: Vary's
  vocabulary step, with the language model frozen), stage 2 the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from .base import register
from .connectors.parallel import ConnectorGroup, ParallelConnectorSpec
from .layers import activation
from .llava import Llava, LlavaConfig, MultiModalProjector, VisionEncoder
from .spec import PartSpecs
from .vision_specs import ParallelVisionSpec, ViTDetSpec


@dataclass
class SamVisionConfig:
    """transformers' ``GotOcr2VisionConfig`` less ``image_size`` (the CLIP's is used for both)."""

    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_heads: int = 12
    patch_size: int = 16
    mlp_dim: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    num_channels: int = 3

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(self.global_attn_indexes)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"sam hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if any(not 0 <= i < self.num_hidden_layers for i in self.global_attn_indexes):
            raise ConfigError(f"sam global_attn_indexes {list(self.global_attn_indexes)} must index blocks "
                              f"0..{self.num_hidden_layers - 1}")


@dataclass
class VaryConfig(LlavaConfig):
    sam_config: SamVisionConfig = field(default_factory=SamVisionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sam_config, dict):
            known = {f.name for f in dataclasses.fields(SamVisionConfig)}
            self.sam_config = SamVisionConfig(**{k: v for k, v in self.sam_config.items() if k in known})
        super().__post_init__()
        size = self.vision_config.image_size
        if size % self.sam_config.patch_size:
            raise ConfigError(f"vision image_size {size} (read by both encoders) is not a multiple of the sam "
                              f"patch_size {self.sam_config.patch_size}")

    @classmethod
    def tiny(cls, **overrides: Any) -> "VaryConfig":
        # SAM's 16x downsampling: a 2x2 grid at 32 px (4 tokens beside CLIP's 16); window 3 > grid, so the
        # windowed block pads (tests/models/test_vary_transformers.py uses a finer grid with several windows)
        base = dict(sam_config=SamVisionConfig(hidden_size=32, output_channels=40, num_hidden_layers=2, num_heads=2,
                                               patch_size=16, mlp_dim=64, window_size=3, global_attn_indexes=(1,)))
        base.update(overrides)
        return super().tiny(**base)


# -------------------------------------------------------------- SAM / ViTDet tower
class SamPatchEmbeddings(nn.Module):
    def __init__(self, sc: SamVisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(sc.num_channels, sc.hidden_size, sc.patch_size, sc.patch_size)


class SamAttention(nn.Module):
    """Multi-head attention over a [B, h, w, D] region with decomposed relative positions."""

    def __init__(self, sc: SamVisionConfig, size: int):
        super().__init__()
        self.num_heads = sc.num_heads
        hd = sc.hidden_size // sc.num_heads
        self.qkv = nn.Linear(sc.hidden_size, 3 * sc.hidden_size, bias=sc.qkv_bias)
        self.proj = nn.Linear(sc.hidden_size, sc.hidden_size)
        self.use_rel_pos = sc.use_rel_pos
        if sc.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, hd))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, hd))

    @staticmethod
    def _by_offset(table: torch.Tensor, size: int) -> torch.Tensor:
        idx = torch.arange(size, device=table.device)
        return table[idx[:, None] - idx[None, :] + size - 1]  # [q, k, hd]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, D = x.shape
        H = self.num_heads
        qkv = self.qkv(x).reshape(B, h * w, 3, H, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv.unbind(0)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            q4 = q.reshape(B * H, h, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", q4, self._by_offset(self.rel_pos_h, h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", q4, self._by_offset(self.rel_pos_w, w))
            scores = scores + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, H, h * w, h * w)
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(B, h, w, D))


class SamMLP(nn.Module):
    def __init__(self, sc: SamVisionConfig):
        super().__init__()
        self.lin1 = nn.Linear(sc.hidden_size, sc.mlp_dim)
        self.lin2 = nn.Linear(sc.mlp_dim, sc.hidden_size)
        self.act = activation(sc.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class SamLayer(nn.Module):
    def __init__(self, sc: SamVisionConfig, grid: int, window: int):
        super().__init__()
        self.window = window
        self.layer_norm1 = nn.LayerNorm(sc.hidden_size, eps=sc.layer_norm_eps)
        self.attn = SamAttention(sc, window or grid)
        self.layer_norm2 = nn.LayerNorm(sc.hidden_size, eps=sc.layer_norm_eps)
        self.mlp = SamMLP(sc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm1(x)
        ws = self.window
        if ws:  # zero-pad to whole windows, attend inside each, crop
            B, H, W, D = h.shape
            ph, pw = -H % ws, -W % ws
            h = F.pad(h, (0, 0, 0, pw, 0, ph))
            Hp, Wp = H + ph, W + pw
            h = h.reshape(B, Hp // ws, ws, Wp // ws, ws, D).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, D)
            h = self.attn(h)
            h = h.reshape(B, Hp // ws, Wp // ws, ws, ws, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, D)
            h = h[:, :H, :W]
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.layer_norm2(x))


class SamLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamNeck(nn.Module):
    def __init__(self, sc: SamVisionConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(sc.hidden_size, sc.output_channels, kernel_size=1, bias=False)
        self.layer_norm1 = SamLayerNorm2d(sc.output_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(sc.output_channels, sc.output_channels, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = SamLayerNorm2d(sc.output_channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm2(self.conv2(self.layer_norm1(self.conv1(x))))


class SamVisionTower(nn.Module):
    """``GotOcr2VisionEncoder``'s modules: pixels -> [B, (S/p)^2, output_channels] tokens, row-major."""

    def __init__(self, sc: SamVisionConfig, image_size: int):
        super().__init__()
        grid = image_size // sc.patch_size
        self.patch_embed = SamPatchEmbeddings(sc)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, sc.hidden_size)) if sc.use_abs_pos else None
        self.layers = nn.ModuleList(
            SamLayer(sc, grid, 0 if i in sc.global_attn_indexes else sc.window_size) for i in range(sc.num_hidden_layers))
        self.neck = SamNeck(sc)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.projection(pixel_values).permute(0, 2, 3, 1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.neck(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------- the two parts
class DualVisionEncoder(nn.Module):
    """``vision_encoder`` part: CLIP features, then SAM features, along the tokens (narrower zero-padded)."""

    def __init__(self, clip: nn.Module, sam: nn.Module, widths: tuple[int, int]):
        super().__init__()
        self.clip, self.sam, self.widths = clip, sam, widths

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        width = max(self.widths)
        feats = [F.pad(f, (0, width - f.shape[-1])) for f in (self.clip(pixel_values), self.sam(pixel_values))]
        return torch.cat(feats, dim=1)


class DualProjector(nn.Module):
    """``connector`` part: each encoder's rows and width sliced back out, projected, concatenated."""

    def __init__(self, clip_proj: nn.Module, sam_proj: nn.Module, clip_tokens: int, widths: tuple[int, int]):
        super().__init__()
        self.clip_proj, self.sam_proj, self.clip_tokens, self.widths = clip_proj, sam_proj, clip_tokens, widths

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, (w1, w2) = self.clip_tokens, self.widths
        return torch.cat((self.clip_proj(feats[:, :n, :w1]), self.sam_proj(feats[:, n:, :w2])), dim=1)


class SamProjector(MultiModalProjector):
    """``mm_projector_vary``: LLaVA's MLP from the SAM neck's channels."""

    def __init__(self, config: VaryConfig):
        super().__init__(config)
        self.linear_1 = nn.Linear(config.sam_config.output_channels, config.hidden_size,
                                  bias=config.multimodal_projector_bias)


# ------------------------------------------------------------------ the model
@register
class Vary(Llava):
    arch_name = "vary"
    # vlmexport's own layout (Vary's checkpoints are custom code; no transformers class reads them)
    hf_architectures = ("VaryForConditionalGeneration",)
    config_class = VaryConfig
    gguf_arch = "llama"
    checkpoint_aliases = Llava.checkpoint_aliases + (
        (r"model\.vision_tower_high\.(.*)", r"vision_tower_high.\1"),  # transformers 4.52+ style module layout
        (r"model\.mm_projector_vary\.(.*)", r"mm_projector_vary.\1"),
    )

    def __init__(self, config: VaryConfig):
        super().__init__(config)
        self.vision_tower_high = SamVisionTower(config.sam_config, config.vision_config.image_size)
        self.mm_projector_vary = SamProjector(config)

    # --------------------------------------------------------------- config I/O
    @classmethod
    def tiny_config(cls, **overrides: Any) -> VaryConfig:
        return VaryConfig.tiny(**overrides)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> VaryConfig:
        base = Llava.config_from_hf(hf)
        sam = dict(hf.get("sam_config") or {})
        size = sam.pop("image_size", base.vision_config.image_size)
        if size != base.vision_config.image_size:
            raise ConfigError(f"vary runs both encoders on one preprocessed image: sam_config.image_size {size} must "
                              f"equal vision_config.image_size {base.vision_config.image_size}")
        if "num_attention_heads" in sam:
            sam["num_heads"] = sam.pop("num_attention_heads")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig)}
        return VaryConfig(**fields, sam_config=sam)

    @classmethod
    def config_to_hf(cls, c: VaryConfig) -> dict[str, Any]:
        hf = super().config_to_hf(c)
        sc = dataclasses.asdict(c.sam_config)
        sc["num_attention_heads"] = sc.pop("num_heads")
        sc["global_attn_indexes"] = list(sc["global_attn_indexes"])
        hf.update(model_type="vary", image_seq_length=cls.part_specs(c).vision.output_tokens,
                  sam_config={"model_type": "got_ocr2_vision", "image_size": c.vision_config.image_size, **sc})
        return hf

    # -------------------------------------------------------------------- hooks
    def _widths(self) -> tuple[int, int]:
        c = self.config
        layers = c.vision_feature_layer if isinstance(c.vision_feature_layer, list) else [0]
        return c.vision_config.hidden_size * len(layers), c.sam_config.output_channels

    def vision_encoder_module(self) -> nn.Module:
        return DualVisionEncoder(VisionEncoder(self.vision_tower, self.config), self.vision_tower_high, self._widths())

    def connector_module(self) -> nn.Module:
        clip_tokens = self.part_specs(self.config).vision.branches[0].output_tokens
        return DualProjector(self.multi_modal_projector, self.mm_projector_vary, clip_tokens, self._widths())

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector_module()(self.vision_encoder_module()(pixel_values))

    def reset_special_parameters(self) -> None:
        super().reset_special_parameters()
        t = self.vision_tower_high
        if t.pos_embed is not None:
            nn.init.normal_(t.pos_embed, std=0.02)
        for layer in t.layers:
            if layer.attn.use_rel_pos:
                nn.init.normal_(layer.attn.rel_pos_h, std=0.02)
                nn.init.normal_(layer.attn.rel_pos_w, std=0.02)

    @classmethod
    def part_specs(cls, c: VaryConfig) -> PartSpecs:
        llava = Llava.part_specs(c)
        sc, S = c.sam_config, "vision_tower_high."
        B = S + "layers.{i}."
        sam = ViTDetSpec(
            image_size=c.vision_config.image_size, patch_size=sc.patch_size, hidden_size=sc.hidden_size,
            mlp_dim=sc.mlp_dim, num_layers=sc.num_hidden_layers, num_heads=sc.num_heads,
            window_size=sc.window_size, global_layers=tuple(sc.global_attn_indexes),
            output_channels=sc.output_channels, layer_norm_eps=sc.layer_norm_eps, activation=sc.hidden_act,
            patch_weight=S + "patch_embed.projection.weight", patch_bias=S + "patch_embed.projection.bias",
            positions=S + "pos_embed" if sc.use_abs_pos else None,
            qkv=B + "attn.qkv.weight", o=B + "attn.proj.weight", fc1=B + "mlp.lin1.weight", fc2=B + "mlp.lin2.weight",
            norm1=B + "layer_norm1.weight", norm2=B + "layer_norm2.weight",
            rel_pos_h=B + "attn.rel_pos_h" if sc.use_rel_pos else None,
            rel_pos_w=B + "attn.rel_pos_w" if sc.use_rel_pos else None,
            neck_conv1=S + "neck.conv1.weight", neck_norm1=S + "neck.layer_norm1.weight",
            neck_conv2=S + "neck.conv2.weight", neck_norm2=S + "neck.layer_norm2.weight")
        vision = ParallelVisionSpec((llava.vision, sam))
        clip_c = llava.connector
        sam_c = dataclasses.replace(clip_c, weights={k: v.replace("multi_modal_projector.", "mm_projector_vary.")
                                                     for k, v in clip_c.weights.items()})
        groups = tuple(ConnectorGroup(spec, off, b.output_tokens, b.output_width)
                       for spec, off, b in zip((clip_c, sam_c), vision.token_offsets, vision.branches))
        connector = ParallelConnectorSpec(kind="parallel", groups=groups)
        return PartSpecs(vision=vision, connector=connector, decoder=llava.decoder)

    def parameter_role(self, name: str) -> str:
        # the SAM projector is the "new vocabulary" connector a first stage aligns alone
        if name.startswith("mm_projector_vary."):
            return "connector_new"
        if name.startswith("vision_tower_high."):
            return "vision"
        return super().parameter_role(name)
