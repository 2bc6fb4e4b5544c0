"""GGUF export for llama.cpp: a text GGUF and an mmproj GGUF, streamed from the checkpoint.

We write GGUF ourselves with the ``gguf`` package's :class:`gguf.GGUFWriter` instead of
running llama.cpp's ``convert_hf_to_gguf.py``, because that converter drops the
visual-expert weights of ``cogvlm`` (its text model skips every tensor named
``vision_*``) and its file then does not load. Everything else is meant to equal what
the converter writes from the same saved checkpoint (same tensor names, shapes, types
and values; same metadata keys and values, tokenizer included), and
``tests/exporter/test_gguf.py`` checks exactly that against the converter. The
deliberate differences, each marked ``DELIBERATE`` below:

1. the ``blk.N.vis_*`` visual-expert tensors are written (and, as a consequence, the
   ``general.size_label`` of the text GGUF counts them);
2. the ViT position-embedding rows are reordered (original rows 1..n, then row 0):
   llama.cpp's ViT appends CLS *after* the patches, the original puts it first;
3. ``clip.use_gelu`` follows the vision activation (``true`` for EVA-CLIP's GELU);
   without it llama.cpp's ViT runs quick-GELU.
4. the ``mlp`` (LLaVA) mmproj has no CLS token (no ``v.class_embd``, no CLS position row).
   Its converter is llama.cpp's legacy ``convert_image_encoder_to_gguf.py`` (``convert_hf_to_gguf.py
   --mmproj`` rejects CLIP towers); llama.cpp 0.3.36 runs that converter's file with every
   patch on its neighbour's position row, the first patch dropped and CLS handed to the LLM
   (upstream issue 25814), and one ViT block short (issue 25817). Without CLS the graph keeps
   the patches in order; the remaining difference (no CLS in the ViT's attention) is measured
   by the build and recorded. Like that converter, the mmproj states its feature layers
   (``clip.vision.feature_layer``) and holds only the blocks up to the deepest one.

Streaming: every tensor's name, shape and type are planned from the checkpoint header,
then header, metadata and tensor infos are written, then the tensor data one tensor at a
time (read -> convert -> write -> drop), so memory holds one tensor whatever the model
size. Files are written under a temporary name and renamed when complete.

Nothing here names a model architecture: the GGUF architecture comes from
``VLM.gguf_arch``, tensor names from ``part_specs`` roles mapped onto gguf-py's
``MODEL_TENSOR`` constants, and the few llama.cpp facts that depend on the GGUF
architecture or the connector kind sit in the small tables below.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..core.errors import ConfigError, require
from ..core.layout import ExpertRouting, PositionIds
from ..core.names import GGUF_EXPERT_TENSORS
from ..core.preprocess import PreprocessConfig
from ..models.base import VLM, VLMConfig
from ..models.checkpoint import PREPROCESSOR, TOKENIZER, CanonicalTensors, SafetensorsCheckpoint, read_config
from ..models.connectors import GGUFProjector, get_connector
from ..models.spec import ConnectorSpec, DecoderSpec, ExpertNames, PartSpecs, VisionSpec, bias_of

gguf = require("gguf", "gguf")
MT = gguf.MODEL_TENSOR
QT = gguf.GGMLQuantizationType

log = logging.getLogger(__name__)

# outtype -> (general.file_type, type of the tensors that follow the outtype)
OUTTYPES: dict[str, tuple[int, Any]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QT.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QT.BF16),
}
_OUTTYPE_ALIASES = {"fp32": "f32", "fp16": "f16", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}

# ----------------------------------------------------------- llama.cpp facts (tables)
# GGUF architectures whose llama.cpp graph applies RoPE in the interleaved ("normal",
# GPT-J) form. Hugging Face checkpoints store q/k for the rotate-half form, so the
# converter permutes their rows (``LlamaModel.permute``); ``cogvlm`` runs NEOX RoPE
# (llama_model_rope_type in src/llama-model.cpp) and needs no permutation.
_INTERLEAVED_ROPE_ARCHS = frozenset({"llama"})

# Expert projections -> (language tensor, visual-expert tensor) as gguf-py MODEL_TENSORs
# (cogvlm's graph reads blk.N.vis_*), from the one name table in vlmexport.core.names,
# which the quantizer's pinning and the llama.cpp backend read too.
_MT_BY_NAME = {v: k for k, v in gguf.TENSOR_NAMES.items()}
EXPERT_TENSORS = {role: tuple(_MT_BY_NAME[f"blk.{{bid}}.{n}"] for n in pair) for role, pair in GGUF_EXPERT_TENSORS.items()}


_FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # KEY_FEATURE_LAYERS in tools/mtmd/clip-impl.h

# SentencePiece token types (llama.cpp's llama_token_type)
_TT_UNUSED = int(gguf.TokenType.UNUSED)


# ------------------------------------------------------------------------ sources
class TensorSource(Protocol):
    """Lazy tensors under the names of ``part_specs`` (what :class:`CanonicalTensors` gives)."""

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class GGUFSource:
    """A model directory opened for GGUF export."""

    path: Path
    arch: type[VLM]
    config: VLMConfig
    hf_config: dict
    specs: PartSpecs
    tensors: TensorSource
    preprocess: PreprocessConfig

    @classmethod
    def open(cls, model_dir: str | os.PathLike, tensors: TensorSource | None = None) -> "GGUFSource":
        path = Path(model_dir)
        arch, config, hf = read_config(path)
        if tensors is None:
            tensors = CanonicalTensors(SafetensorsCheckpoint(path), arch)
        if not (path / TOKENIZER).is_file():
            raise ConfigError(f"{path}: {TOKENIZER} is missing; the text GGUF carries the model's SentencePiece "
                              "vocabulary: copy the tokenizer into the model directory")
        return cls(path=path, arch=arch, config=config, hf_config=hf, specs=arch.part_specs(config),
                   tensors=tensors, preprocess=PreprocessConfig.load(path / PREPROCESSOR))

    @property
    def gguf_arch(self) -> str:
        return self.specs.decoder.gguf_arch or self.arch.gguf_arch

    def hf_text_config(self) -> dict:
        """config.json with ``text_config`` lifted to the top, as llama.cpp's converter reads it."""
        return {**self.hf_config, **(self.hf_config.get("text_config") or {})}


# ----------------------------------------------------------------------- planning
@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where its data comes from and how it is stored."""

    name: str  # GGUF name
    source: str  # tensor name in the checkpoint (``part_specs`` naming)
    shape: tuple[int, ...]  # numpy order (GGUF lists it reversed)
    qtype: Any  # gguf.GGMLQuantizationType
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    note: str = ""  # why the data differs from the checkpoint, if it does

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.qtype == QT.F32 else 2)


def normalize_outtype(outtype: str) -> str:
    o = _OUTTYPE_ALIASES.get(outtype.lower(), outtype.lower())
    if o not in OUTTYPES:
        raise ConfigError(f"GGUF output type {outtype!r} is not supported; choose one of {sorted(OUTTYPES)} "
                          "(quantized types come from llama-quantize on an f16 file)")
    return o


def _tensor_name(arch: Any, key: Any, bid: int | None = None, suffix: str = ".weight") -> str:
    """gguf-py's canonical name for ``key``; a clear error if llama.cpp's ``arch`` has no such tensor."""
    if key not in gguf.MODEL_TENSORS[arch]:
        raise ConfigError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture has no {key.name} tensor; "
                          "this model cannot be exported to GGUF")
    name = gguf.TENSOR_NAMES[key]
    return (name.format(bid=bid) if bid is not None else name) + suffix


def _qtype(name: str, ndim: int, outtype: str, mmproj: bool) -> Any:
    """The converter's storage-type rules (``ModelBase.prepare_tensors`` and
    ``MmprojModel.tensor_force_quant`` in llama.cpp's conversion/base.py)."""
    if ndim <= 1 or name.endswith("_norm.weight"):
        return QT.F32  # 1-D tensors and norms stay F32
    if not name.endswith(".weight"):
        return QT.F32  # v.class_embd, v.boi, v.eoi, biases
    if name in (gguf.TENSOR_NAMES[MT.POS_EMBD] + ".weight", gguf.TENSOR_NAMES[MT.V_ENC_EMBD_POS] + ".weight"):
        return QT.F32
    if mmproj and ".patch_embd.weight" in name:
        return QT.F16 if outtype == "f16" else QT.F32
    return OUTTYPES[outtype][1]


class _Planner:
    def __init__(self, src: GGUFSource, outtype: str, mmproj: bool):
        self.src, self.outtype, self.mmproj = src, outtype, mmproj
        self.arch = gguf.MODEL_ARCH.MMPROJ if mmproj else _model_arch(src.gguf_arch)
        self.out: list[PlannedTensor] = []
        self.names = set(src.tensors.keys())

    def add(self, key: Any, source: str, bid: int | None = None, suffix: str = ".weight",
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None, note: str = "",
            shape: tuple[int, ...] | None = None) -> None:
        """``shape``: the stored shape when ``transform`` changes it (else the checkpoint's)."""
        name = _tensor_name(self.arch, key, bid, suffix)
        if source not in self.names:
            raise ConfigError(f"{self.src.path}: the checkpoint has no tensor {source} (needed for GGUF {name}); "
                              "it is incomplete or of another architecture")
        shape = tuple(shape or self.src.tensors.shape(source))
        self.out.append(PlannedTensor(name, source, shape, _qtype(name, len(shape), self.outtype, self.mmproj),
                                      transform, note))

    def add_with_bias(self, key: Any, weight: str, bid: int | None = None) -> None:
        self.add(key, weight, bid)
        if bias_of(weight) in self.names:
            self.add(key, bias_of(weight), bid, suffix=".bias")


def _model_arch(gguf_arch: str) -> Any:
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if gguf_arch not in by_name:
        raise ConfigError(f"GGUF architecture {gguf_arch!r} is unknown to the installed gguf package; upgrade it "
                          "(`pip install -U gguf`)")
    return by_name[gguf_arch]


def _permute_rope(n_head: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of a q/k projection from the rotate-half to the interleaved RoPE layout: within
    each head, row pairs (i, i + d/2) become adjacent (what llama.cpp's converter does)."""

    def f(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return f


def plan_text(src: GGUFSource, outtype: str) -> list[PlannedTensor]:
    """The text GGUF's tensors, in llama.cpp's names, from the decoder spec's roles."""
    d: DecoderSpec = src.specs.decoder
    p = _Planner(src, outtype, mmproj=False)
    interleaved = src.gguf_arch in _INTERLEAVED_ROPE_ARCHS
    p.add(MT.TOKEN_EMBD, d.embed)
    for i in range(d.num_layers):
        layer = lambda s: s.format(i=i)  # noqa: E731
        p.add(MT.ATTN_NORM, layer(d.attn_norm), i)
        _plan_expert(p, d, d.language, i, interleaved, vision=False)
        p.add(MT.FFN_NORM, layer(d.ffn_norm), i)
        if d.vision is not None:
            # DELIBERATE (1): llama.cpp's converter drops these (its text filter skips names with
            # "vision_"); llama.cpp's cogvlm graph needs them, so without them the file does not load.
            _plan_expert(p, d, d.vision, i, interleaved, vision=True)
    p.add(MT.OUTPUT_NORM, d.final_norm)
    if d.lm_head != d.embed:  # tied embeddings: llama.cpp reuses token_embd when output is absent
        p.add(MT.OUTPUT, d.lm_head)
    return p.out


def _plan_expert(p: _Planner, d: DecoderSpec, e: ExpertNames, i: int, interleaved: bool, vision: bool) -> None:
    f = lambda s: s.format(i=i)  # noqa: E731
    keys = {role: pair[1 if vision else 0] for role, pair in EXPERT_TENSORS.items()}
    if isinstance(e.qkv, str):
        if interleaved:
            raise ConfigError(f"a fused QKV weight cannot be written for llama.cpp's {p.src.gguf_arch} "
                              "architecture (its RoPE layout needs q and k permuted separately)")
        p.add(keys["qkv"], f(e.qkv), i)
    else:
        if vision:
            raise ConfigError("llama.cpp's visual experts take one fused QKV weight; this model has separate ones")
        q, k, v = (f(n) for n in e.qkv)
        p.add(MT.ATTN_Q, q, i, transform=_permute_rope(d.num_heads) if interleaved else None,
              note="rows permuted to llama.cpp's interleaved RoPE layout" if interleaved else "")
        p.add(MT.ATTN_K, k, i, transform=_permute_rope(d.num_kv_heads) if interleaved else None,
              note="rows permuted to llama.cpp's interleaved RoPE layout" if interleaved else "")
        p.add(MT.ATTN_V, v, i)
    if e.qkv_bias is not None:  # Qwen2-style attention biases (llama.cpp's qwen2 graph reads attn_{q,k,v}.bias)
        if isinstance(e.qkv_bias, str) or vision or interleaved:
            raise ConfigError(f"q/k/v biases are written only as separate tensors of a non-expert, NEOX-RoPE "
                              f"decoder; llama.cpp's {p.src.gguf_arch} cannot take this model's")
        for key, n in zip((MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V), e.qkv_bias):
            p.add(key, f(n), i, suffix=".bias")
    p.add(keys["o"], f(e.o), i)
    p.add(keys["gate"], f(e.gate), i)
    p.add(keys["up"], f(e.up), i)
    p.add(keys["down"], f(e.down), i)


def projector_for(specs: PartSpecs) -> GGUFProjector:
    """The llama.cpp projector that runs this model's vision side (its connector kind's), or a clear error."""
    return get_connector(specs.connector.kind).check_gguf(specs)


def vit_blocks(specs: PartSpecs) -> int:
    """ViT blocks the mmproj holds (``clip.vision.block_count``): a projector that reads an
    explicit feature layer (llava's mlp) gets only the blocks up to the deepest one (as llama.cpp's
    llava converter writes them); the others (cogvlm) run every block."""
    v = specs.vision
    return v.layers_used if projector_for(specs).explicit_feature_layers else v.num_layers


def _swap_ffn_names(specs: PartSpecs) -> bool:
    """llama.cpp swaps a ViT block's ffn_up / ffn_down when ffn_down's input width equals the
    embedding width (``is_ffn_swapped`` in tools/mtmd/clip.cpp: files from the legacy llava
    converter name fc1 ffn_down). For the mlp projector with intermediate_size == hidden_size
    that test fires on correctly named files too, so they are written in the legacy naming,
    which the swap then undoes (``GGUFProjector.legacy_square_ffn``)."""
    v = specs.vision
    return projector_for(specs).legacy_square_ffn and v.intermediate_size == v.hidden_size


def _reorder_cls_last(w: torch.Tensor) -> torch.Tensor:
    # DELIBERATE (2): original rows 1..n (the patches) first, then row 0 (CLS), matching
    # llama.cpp's ViT, which concatenates CLS after the patches and then adds the rows in order.
    return torch.cat((w[1:], w[:1]), dim=0)


def _drop_cls_row(w: torch.Tensor) -> torch.Tensor:
    # DELIBERATE (4): the patch rows 1..n only (no CLS token in the file)
    return w[1:]


def plan_mmproj(src: GGUFSource, outtype: str) -> list[PlannedTensor]:
    """The mmproj GGUF's tensors: ViT then connector, in libmtmd's names."""
    v: VisionSpec = src.specs.vision
    c: ConnectorSpec = src.specs.connector
    proj = projector_for(src.specs)
    p = _Planner(src, outtype, mmproj=True)
    special = {"@boi": c.boi, "@eoi": c.eoi}
    for t in get_connector(c.kind).gguf_tensors(c):
        p.add(MT[t.key], special[t.role] if t.role in special else c.weights[t.role], t.bid, suffix=t.suffix)
    rows = v.num_patches + 1
    pos_shape = tuple(src.tensors.shape(v.positions))
    if len(pos_shape) == 3 and pos_shape[0] == 1:  # timm's [1, rows, D] (InternViT): written as [rows, D]
        pos_shape = pos_shape[1:]
    if pos_shape[0] != rows:
        raise ConfigError(f"{src.path}: {v.positions} has {pos_shape[0]} rows, expected "
                          f"{rows} (CLS + {v.num_patches} patches)")
    flat = lambda t: t.reshape(pos_shape)  # noqa: E731  (a no-op on [rows, D])
    if proj.drop_cls:  # DELIBERATE (4)
        p.add(MT.V_ENC_EMBD_POS, v.positions, transform=lambda t: _drop_cls_row(flat(t)),
              shape=(rows - 1, *pos_shape[1:]),
              note="CLS row dropped (no CLS token: llama.cpp's llava graph would drop the first patch)")
    else:
        p.add(MT.V_ENC_EMBD_CLS, v.cls, suffix="")
        reorder = (lambda t: _reorder_cls_last(flat(t))) if proj.cls_last else None
        p.add(MT.V_ENC_EMBD_POS, v.positions, transform=reorder, shape=pos_shape if reorder else None,
              note="rows reordered: patches first, CLS last (llama.cpp appends CLS after the patches)")
    if v.patch_bias is not None:
        p.add(MT.V_ENC_EMBD_PATCH, v.patch_bias, suffix=".bias")
    p.add(MT.V_ENC_EMBD_PATCH, v.patch_weight)
    if v.pre_norm is not None:
        p.add(MT.V_PRE_NORM, v.pre_norm[0])
        p.add(MT.V_PRE_NORM, v.pre_norm[1], suffix=".bias")
    up, down = (MT.V_ENC_FFN_DOWN, MT.V_ENC_FFN_UP) if _swap_ffn_names(src.specs) else (MT.V_ENC_FFN_UP,
                                                                                      MT.V_ENC_FFN_DOWN)
    for i in range(vit_blocks(src.specs)):
        f = lambda s: s.format(i=i)  # noqa: E731
        p.add_with_bias(MT.V_ENC_ATTN_O, f(v.o), i)
        if isinstance(v.qkv, str):
            p.add_with_bias(MT.V_ENC_ATTN_QKV, f(v.qkv), i)
        else:
            for key, n in zip((MT.V_ENC_ATTN_Q, MT.V_ENC_ATTN_K, MT.V_ENC_ATTN_V), v.qkv):
                p.add_with_bias(key, f(n), i)
        p.add_with_bias(MT.V_ENC_INPUT_NORM, f(v.norm1), i)
        p.add_with_bias(up, f(v.fc1), i)
        p.add_with_bias(down, f(v.fc2), i)
        p.add_with_bias(MT.V_ENC_POST_ATTN_NORM, f(v.norm2), i)
        if v.ls1 is not None:  # layer scale (llama.cpp's build_vit multiplies by ls1 / ls2 when present)
            p.add(MT.V_LAYER_SCALE_1, f(v.ls1), i)
        if v.ls2 is not None:
            p.add(MT.V_LAYER_SCALE_2, f(v.ls2), i)
    return p.out


# ------------------------------------------------------------------------ metadata
def _general(w, src: GGUFSource, file_type: str) -> None:
    """general.type / name / size_label, as the converter derives them (gguf.Metadata from the
    model directory; the name falls back to the directory name)."""
    w.add_type(file_type)
    total, shared, expert, count = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src.path, None, total)
    if meta.name is None:
        meta.name = src.path.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    meta.set_gguf_meta_model(w)


def _text_kv(w, src: GGUFSource, outtype: str) -> None:
    d = src.specs.decoder
    hf = src.hf_text_config()
    _general(w, src, gguf.GGUFType.MODEL)
    w.add_block_count(d.num_layers)
    w.add_context_length(d.max_position_embeddings)
    w.add_embedding_length(d.hidden_size)
    w.add_feed_forward_length(d.intermediate_size)
    w.add_head_count(d.num_heads)
    w.add_head_count_kv(d.num_kv_heads)
    w.add_rope_freq_base(d.rope_theta)
    w.add_layer_norm_rms_eps(d.rms_norm_eps)
    if "head_dim" in hf:  # the converter writes these only when config.json states head_dim
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    w.add_file_type(OUTTYPES[outtype][0])
    w.add_vocab_size(d.vocab_size)
    w.add_rope_dimension_count(d.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab_kv(w, src, d.vocab_size)


def sentencepiece_vocab(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """tokens / scores / types from ``tokenizer.model``, padded to the model's vocab size with
    ``[PAD<id>]`` pieces (score -10000, type UNUSED), as llama.cpp's converter does."""
    spm = gguf.SentencePieceVocab(model_dir)
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores: list[float] = [-10000.0] * vocab_size
    types: list[int] = [_TT_UNUSED] * vocab_size
    for i, (text, score, ttype) in enumerate(spm.all_tokens()):
        if i >= vocab_size:
            log.warning("%s: the tokenizer has more pieces than vocab_size %d; ignoring the rest",
                        model_dir / TOKENIZER, vocab_size)
            break
        tokens[i], scores[i], types[i] = text, float(score), int(ttype)
    return tokens, scores, types


def _vocab_kv(w, src: GGUFSource, vocab_size: int) -> None:
    tokens, scores, types = sentencepiece_vocab(src.path, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(src.path, n_vocab=len(tokens)).add_to_gguf(w)


def _mmproj_kv(w, src: GGUFSource, outtype: str) -> None:
    v, pre = src.specs.vision, src.preprocess
    proj = projector_for(src.specs)
    _general(w, src, gguf.GGUFType.MMPROJ)
    w.add_file_type(OUTTYPES[outtype][0])
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(src.specs.decoder.hidden_size)
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(vit_blocks(src.specs))
    w.add_vision_head_count(v.num_heads)
    w.add_vision_image_mean(list(pre.image_mean))
    w.add_vision_image_std(list(pre.image_std))
    w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    w.add_clip_projector_type(proj.projector_type)
    # DELIBERATE (3): without clip.use_gelu llama.cpp's ViT MLP runs quick-GELU; write the key
    # whenever the model's activation is GELU (EVA-CLIP). quick_gelu is llama.cpp's default.
    if v.activation == "gelu":
        w.add_vision_use_gelu(True)
    elif v.activation == "silu":
        w.add_vision_use_silu(True)
    # The feature layers, always explicit where the graph reads them (indices into [embeddings,
    # layer 1, ..., layer n]), as llama.cpp's llava converter writes them from vision_feature_layer:
    # without the key the llava graph runs block_count - 1 blocks (upstream issue 25817 proposes
    # block_count), so an implicit default would change meaning with the llama.cpp version.
    if proj.explicit_feature_layers:
        w.add_array(_FEATURE_LAYER_KEY, [int(x) for x in v.feature_layers])
    for key, value in get_connector(src.specs.connector.kind).gguf_metadata(src.specs.connector).items():
        w.add_uint32(key, int(value))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -------------------------------------------------------------------------- writing
def _to_numpy(t: torch.Tensor, qtype: Any) -> np.ndarray:
    # the converter converts anything but f16/f32 to f32 first, then casts / rounds with numpy
    if t.dtype not in (torch.float16, torch.float32):
        t = t.to(torch.float32)
    a = t.detach().cpu().contiguous().numpy()
    if qtype == QT.F32:
        return a.astype(np.float32, copy=False)
    if qtype == QT.F16:
        return a.astype(np.float16, copy=False)
    return gguf.quants.quantize(a.astype(np.float32, copy=False), qtype)  # BF16, round-to-nearest-even


def write_gguf(path: str | os.PathLike, gguf_arch: str, plan: Sequence[PlannedTensor], tensors: TensorSource,
               metadata: Callable[[Any], None]) -> Path:
    """Write one GGUF file from a plan, streaming tensor data one tensor at a time.

    ``metadata(writer)`` adds the key/values; it runs after every tensor info is known, so
    parameter counts are available. The file appears at ``path`` only when complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    w = gguf.GGUFWriter(None, gguf_arch)
    for t in plan:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    metadata(w)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            data = tensors.get(t.source)
            if t.transform is not None:
                data = t.transform(data)
            if tuple(data.shape) != t.shape:
                raise ConfigError(f"tensor {t.source} changed shape while exporting ({list(data.shape)} vs "
                                  f"{list(t.shape)}); the checkpoint is inconsistent")
            arr = _to_numpy(data, t.qtype)
            del data
            w.write_tensor_data(arr)
            del arr
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_gguf(src: GGUFSource, path: str | os.PathLike, outtype: str = "f16") -> Path:
    outtype = normalize_outtype(outtype)
    return write_gguf(path, src.gguf_arch, plan_text(src, outtype), src.tensors,
                      lambda w: _text_kv(w, src, outtype))


def write_mmproj_gguf(src: GGUFSource, path: str | os.PathLike, outtype: str = "f16") -> Path:
    outtype = normalize_outtype(outtype)
    return write_gguf(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], plan_mmproj(src, outtype), src.tensors,
                      lambda w: _mmproj_kv(w, src, outtype))


# ------------------------------------------------------------------------ semantics
def semantics_deviations(config: VLMConfig) -> list[str]:
    """What llama.cpp cannot reproduce of this model's routing / position semantics, and what it
    runs instead (the llamacpp backend runs a layout in llama.cpp's semantics)."""
    notes = []
    if config.expert_routing != ExpertRouting.IMAGE_CHUNK.value:
        notes.append(f"gguf: llama.cpp routes every image position (boi..eoi) to the visual expert (its cogvlm "
                     f"semantics); this model's expert_routing is {config.expert_routing!r}, so GGUF outputs "
                     f"differ from the reference")
    if config.position_ids != PositionIds.SEQUENTIAL.value:
        notes.append(f"gguf: llama.cpp's causal mask compares position ids, so it is run with one position per "
                     f"token (image tokens included); this model's position_ids are {config.position_ids!r}, so "
                     f"GGUF outputs differ from the reference")
    return notes


def gguf_deviations(specs: PartSpecs, config: VLMConfig) -> list[str]:
    """Everything a GGUF export of this model runs differently from the model, known before any
    file is written (``vlmexport build`` refuses them unless told to measure and record them)."""
    notes = semantics_deviations(config)
    issue = projector_for(specs).known_issue
    return notes + ([issue] if issue else [])


# --------------------------------------------------------------------------- export
@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    text: Path
    mmproj: Path
    outtype: str
    gguf_arch: str
    text_tensors: tuple[str, ...]
    mmproj_tensors: tuple[str, ...]
    deviations: tuple[str, ...] = ()
    seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # tensor -> why its data differs from the checkpoint


def gguf_file_names(name: str, outtype: str) -> tuple[str, str]:
    """``<name>.<outtype>.gguf`` and ``mmproj-<name>.<outtype>.gguf`` (DESIGN.md's bundle layout)."""
    outtype = normalize_outtype(outtype)
    return f"{name}.{outtype}.gguf", f"mmproj-{name}.{outtype}.gguf"


def export_gguf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, outtype: str = "f16",
                name: str = "model", tensors: TensorSource | None = None) -> GGUFExport:
    """Write the text GGUF and the mmproj GGUF of a model directory into ``out_dir``.

    A model that llama.cpp cannot reproduce (:func:`gguf_deviations`: ``hf_cogvlm`` semantics,
    the llava projector) is exported with a warning, and the deviations are returned; ``vlmexport
    build`` decides about them before calling this.
    """
    t0 = time.perf_counter()
    outtype = normalize_outtype(outtype)
    src = GGUFSource.open(model_dir, tensors)
    deviations = gguf_deviations(src.specs, src.config)
    for note in deviations:
        warnings.warn(note, stacklevel=2)
        log.warning("%s", note)
    text_plan, mm_plan = plan_text(src, outtype), plan_mmproj(src, outtype)  # validate both before writing
    text_name, mm_name = gguf_file_names(name, outtype)
    out = Path(out_dir)
    text = write_gguf(out / text_name, src.gguf_arch, text_plan, src.tensors, lambda w: _text_kv(w, src, outtype))
    mm = write_gguf(out / mm_name, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], mm_plan, src.tensors,
                    lambda w: _mmproj_kv(w, src, outtype))
    notes = {t.name: t.note for t in (*text_plan, *mm_plan) if t.note}
    return GGUFExport(text=text, mmproj=mm, outtype=outtype, gguf_arch=src.gguf_arch,
                      text_tensors=tuple(t.name for t in text_plan), mmproj_tensors=tuple(t.name for t in mm_plan),
                      deviations=tuple(deviations), seconds=time.perf_counter() - t0, notes=notes)
