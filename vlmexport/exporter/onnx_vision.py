"""ONNX export of the ``vision_encoder`` and ``connector`` parts, straight from checkpoint tensors.

The graphs are written by :class:`~vlmexport.exporter.onnx_common.GraphBuilder` from a
:class:`~vlmexport.models.spec.VisionSpec` / :class:`~vlmexport.models.spec.ConnectorSpec`
and a tensor source (``SafetensorsCheckpoint``, or :class:`StateDictTensors` over an
in-memory model), never by tracing a module: weights stream into the external data
file one tensor at a time, so a ViT bigger than RAM exports, and the same code serves
every architecture (nothing here names one).

Graphs (``num_images`` is the one dynamic axis; sizes come from the spec)::

    vision_encoder  pixel_values [num_images, 3, S, S]
                 -> image_features [num_images, n_patches (+1 with keep_cls), Dv * len(feature_layers)]
    connector       image_features [num_images, T, Dv']
                 -> image_embeds [num_images, T' (+1 boi) (+1 eoi), hidden]   (T': the kind's count)

Vision encoder: patch Conv -> CLS first -> + learned positions ([n+1, D] or [1, n+1, D])
-> optional pre-LayerNorm -> blocks, either post-norm (EVA: ``x + LN(attn(x))``,
``x + LN(mlp(x))``) or pre-norm (CLIP: ``x + attn(LN(x))``, ``x + mlp(LN(x))``) -> optional
post-LayerNorm on the last layer's output (BLIP-2's ``post_layernorm``). ``feature_layers`` indexes the hidden
states ``[embeddings (after the pre-norm), layer 1, ..., layer N]``; several are
concatenated along the feature axis; only the layers up to the deepest one used are
exported. CLS is dropped unless ``keep_cls``. Biases are found by name
(``spec.bias_of``): a projection has one when the checkpoint holds it.

Connectors: each kind writes its own projection (``vlmexport.models.connectors``, one
file per kind) through :class:`_ConnectorOps`; a role ``R`` has a bias when the spec's
``weights`` names ``R_bias``. ``boi`` / ``eoi`` embeddings, when the spec names them,
are concatenated around the projected patches.

fp16: weights, constants and IO are float16, with no Casts. LayerNorm keeps its
statistics in float32 (``stash_type=1``). Measured on the tiny test encoders (both
architectures, 3 seeds, onnxruntime 1.31 CPU) the fp16 error is 0.8-1.3e-3 of the
output scale (tolerance 1e-2); computing softmax in fp32 (Cast, Softmax, Cast) left it
unchanged to 4 digits, and LayerNorm fully in fp32 lowered it by at most 1.5e-4 of the
scale, so neither is worth the extra Casts.

Why not optimum
---------------
The user asked to use optimum's exporter and validation where it fits (the llava
vision tower is a standard CLIP model). Findings (PyPI, checked with this project's
torch 2.13 CPU, transformers 5.23.0, onnx 1.23.2, onnxruntime 1.31.1):

1. It does not run with transformers 5. The ONNX exporter now lives in
   ``optimum-onnx`` (latest 0.1.0; optimum 2.x itself no longer ships
   ``optimum.exporters.onnx``). optimum-onnx 0.1.0 requires ``optimum~=2.1.0`` and
   ``transformers>=4.36,<4.58``: ``pip install --dry-run optimum-onnx`` (and
   ``optimum[onnx]`` 2.3.0) would downgrade transformers 5.23.0 to 4.57.6, which the
   ``llava`` layout (transformers 5 module names) and the tests forbid. Installed with
   ``--no-deps`` in a throwaway venv over transformers 5.23.0 (with optimum 2.1.0 and
   2.3.0), ``from optimum.exporters.onnx import main_export`` fails:
   ``ImportError: cannot import name 'get_parameter_dtype' from
   'transformers.modeling_utils'``; shimming that symbol only moves the failure to
   ``cannot import name '_CAN_RECORD_REGISTRY'`` and then ``'OutputRecorder' from
   'transformers.utils.generic'`` (private transformers 4.x internals). Upstream
   tracks this as huggingface/optimum-onnx issue #114 ("transformers>=5.0.0
   support"), open at the time of writing. The last optimum with the exporter in-tree,
   1.27.0, pins ``transformers<4.54`` for its ``exporters`` extra and fails the same
   import with ``cannot import name 'is_tf_available' from 'transformers'``.
2. With transformers 4.57.6 (throwaway venv) it exports a ``CLIPVisionModel`` but not
   what the ``vision_encoder`` part is. ``main_export(task="feature-extraction")``
   writes ``last_hidden_state`` / ``pooler_output``; llava needs the hidden state of
   ``vision_feature_layer`` (-2: the penultimate layer), CLS dropped, optionally
   several layers concatenated, which needs a custom ``OnnxConfig`` plus a wrapper
   module, i.e. our own graph definition anyway. ``task="image-text-to-text"`` on the
   whole ``LlavaForConditionalGeneration`` is refused: "Trying to export a llava
   model, that is a custom or unsupported architecture, but no custom onnx
   configuration was passed". A ``CLIPVisionModel`` directory saved by transformers
   5 (no ``vision_model.`` prefix) loads into 4.57.6 with *every* weight newly
   initialised, and optimum's validation still passes because it compares against
   that same randomly initialised model: it cannot catch a wrong source.
3. It cannot express what this exporter needs: optimum traces an instantiated
   ``transformers`` model (the whole tower in RAM, weights re-serialized by
   ``torch.onnx``), so a tower bigger than RAM does not export; ``cogvlm``'s EVA
   encoder, GLU connector and visual-expert decoder are not transformers classes at
   all, so optimum could at best cover one of the two architectures' towers and the
   exports would stop sharing one layout.

Where optimum does run (transformers 4.57.6, throwaway venv), it agrees with this
builder: for the tiny jittered ``llava`` tower copied into a ``CLIPVisionModel``,
optimum's ``last_hidden_state`` and this builder's encoder with
``feature_layers=(N,)``, ``keep_cls=True`` were bit-identical on 3 images in
onnxruntime 1.31 (both 1.9e-6 from transformers' fp32 output, scale 4.35). Its
validation order (names -> dynamic axes -> shapes -> values, raising with the largest
difference) is what :mod:`vlmexport.pipeline.parity` implements, without the
dependency.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..core.errors import CheckpointError, ConfigError
from ..models.connectors import get_connector
from ..models.spec import ConnectorSpec, VisionSpec, bias_of
from ..models.vision_specs import ParallelVisionSpec, ViTDetSpec
from .onnx_common import (  # noqa: F401  (re-exported for the bundle builder and tests)
    ExportedGraph,
    GraphBuilder,
    IOSpec,
    StateDictTensors,
    TensorSource,
    fused_name,
)
from .onnx_vision_kinds import write_parallel, write_vitdet

NUM_IMAGES = "num_images"
INT64_MAX = 2**63 - 1


class _Weights:
    """Checked access to a tensor source: a missing tensor or a wrong shape is one clear error."""

    def __init__(self, tensors: TensorSource, part: str):
        self.tensors = tensors
        self.names = set(tensors.keys())
        self.part = part

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, shape: tuple[int | None, ...] | None = None, numel: int | None = None) -> torch.Tensor:
        if name not in self.names:
            raise CheckpointError(f"the checkpoint lacks tensor {name}, which the {self.part} needs; "
                                  "the checkpoint is incomplete or its config describes another model")
        t = self.tensors.get(name)
        bad_shape = shape is not None and (len(t.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(t.shape, shape)))
        if bad_shape or (numel is not None and t.numel() != numel):
            want = list(shape) if shape is not None else f"{numel} elements"
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)} but the {self.part} config implies "
                                  f"{want}; the config contradicts the weights")
        return t


def _linear(g: GraphBuilder, w: _Weights, x: str, names: str | tuple[str, ...], out_in: tuple[int, int],
            bias_names: str | tuple[str, ...] | None = None) -> str:
    """Stream a (possibly q/k/v-fused) nn.Linear weight and its bias; return ``x @ W + b``.

    ``out_in`` is the (out, in) shape of each part. ``bias_names``: explicit bias
    name(s); by default the ``bias_of`` names, used when the checkpoint holds them all.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    parts = [w.get(n, out_in) for n in names]
    weight = g.linear_weight(fused_name(names), parts)
    del parts  # the written weight is no longer held
    if bias_names is None:
        guess = tuple(bias_of(n) for n in names)
        present = [w.has(b) for b in guess]
        if any(present) and not all(present):
            missing = [b for b, p in zip(guess, present) if not p]
            raise CheckpointError(f"the checkpoint holds some biases of {fused_name(names)} but lacks {missing}")
        bias_names = guess if all(present) else ()
    elif isinstance(bias_names, str):
        bias_names = (bias_names,)
    bias = None
    if bias_names:
        bias = g.bias(fused_name(bias_names).replace("_proj.weight", "_proj.bias"),
                      [w.get(b, numel=out_in[0]) for b in bias_names])
    return g.linear(x, weight, bias)


def _layer_norm(g: GraphBuilder, w: _Weights, x: str, weight: str, bias: str | None, dim: int, eps: float) -> str:
    scale = g.weight(weight, w.get(weight, numel=dim), shape=(dim,))
    shift = g.weight(bias, w.get(bias, numel=dim), shape=(dim,)) if bias and w.has(bias) else None
    return g.layer_norm(x, scale, shift, eps)


def _vit_block(g: GraphBuilder, w: _Weights, spec: VisionSpec, i: int, x: str) -> str:
    D, F = spec.hidden_size, spec.intermediate_size
    hd = D // spec.num_heads

    def name(template: str) -> str:
        return template.format(i=i)

    def norm(template: str, v: str) -> str:
        return _layer_norm(g, w, v, name(template), bias_of(name(template)), D, spec.layer_norm_eps)

    def attention(v: str) -> str:
        if isinstance(spec.qkv, str):
            qkv = _linear(g, w, v, name(spec.qkv), (3 * D, D))
        else:
            qkv = _linear(g, w, v, tuple(name(n) for n in spec.qkv), (D, D))
        q, k, vv = (g.split_heads(t, spec.num_heads, hd) for t in g.node("Split", [qkv], n_outputs=3, axis=-1))
        return _linear(g, w, g.merge_heads(g.sdpa(q, k, vv, hd), D), name(spec.o), (D, D))

    def mlp(v: str) -> str:
        h = g.activation(_linear(g, w, v, name(spec.fc1), (F, D)), spec.activation)
        return _linear(g, w, h, name(spec.fc2), (D, F))

    def scale(template: str | None, v: str) -> str:  # layer scale: a per-channel factor on the branch
        if template is None:
            return v
        return g.node("Mul", [v, g.weight(name(template), w.get(name(template), numel=D), shape=(D,))])

    if spec.norm_placement == "post":
        x = g.node("Add", [x, scale(spec.ls1, norm(spec.norm1, attention(x)))])
        return g.node("Add", [x, scale(spec.ls2, norm(spec.norm2, mlp(x)))])
    if spec.norm_placement == "pre":
        x = g.node("Add", [x, scale(spec.ls1, attention(norm(spec.norm1, x)))])
        return g.node("Add", [x, scale(spec.ls2, mlp(norm(spec.norm2, x)))])
    raise ConfigError(f"vision norm_placement must be 'pre' or 'post', got {spec.norm_placement!r}")


def export_vision_encoder(tensors: TensorSource, spec: VisionSpec, out_path: str | os.PathLike,
                          precision: str = "fp32") -> ExportedGraph:
    """Write the vision encoder as ``out_path`` + ``out_path.data`` (weights streamed).

    ``pixel_values`` [num_images, C, S, S] -> ``image_features`` [num_images, tokens, width]
    with tokens = ``spec.output_tokens`` and width = ``spec.output_width``. ``spec`` is a
    ViT :class:`VisionSpec` or a spec type of ``models/vision_specs.py`` (graph by type).
    """
    w = _Weights(tensors, "vision encoder")
    with GraphBuilder(out_path, "vision_encoder", precision) as g:
        declared: dict[int, str] = {}

        def pixels(channels: int) -> str:  # declared by the first patch conv read (its weight says the channels)
            if declared and channels not in declared:
                raise CheckpointError(f"the vision encoders read {sorted(declared)[0]} and {channels} image "
                                      "channels; every encoder must read the same pixel_values")
            if not declared:
                declared[channels] = g.input("pixel_values", (NUM_IMAGES, channels, spec.image_size, spec.image_size))
            return declared[channels]

        x = _encoder(g, w, spec, pixels)
        g.output(x, "image_features", (NUM_IMAGES, spec.output_tokens, spec.output_width))
        return g.finish({"part": "vision_encoder", "precision": precision})


def _encoder(g: GraphBuilder, w: _Weights, spec, pixels) -> str:
    """The graph of ``spec``'s encoder type on ``pixels(channels)`` (the input's name): [B, tokens, width]."""
    if isinstance(spec, ParallelVisionSpec):
        return write_parallel(g, spec, pixels, lambda branch, px: _encoder(g, w, branch, px))
    if isinstance(spec, ViTDetSpec):
        return write_vitdet(g, w, spec, pixels, _linear, _layer_norm)
    return _vit(g, w, spec, pixels)


def _vit(g: GraphBuilder, w: _Weights, spec: VisionSpec, pixels) -> str:
    D, p, n = spec.hidden_size, spec.patch_size, spec.num_patches
    layers = tuple(spec.feature_layers) or (spec.num_layers,)
    if any(not 0 <= j <= spec.num_layers for j in layers):
        raise ConfigError(f"vision feature_layers {layers} must index hidden states 0..{spec.num_layers}")
    if spec.post_norm is not None and layers != (spec.num_layers,):
        raise ConfigError(f"a vision post_norm normalises the last layer's output; feature_layers {layers} must be "
                          f"({spec.num_layers},)")
    patch = w.get(spec.patch_weight, (D, None, p, p))
    pixels = pixels(patch.shape[1])
    conv_in = [pixels, g.weight(spec.patch_weight, patch)]
    del patch
    if spec.patch_bias:
        conv_in.append(g.weight(spec.patch_bias, w.get(spec.patch_bias, numel=D), shape=(D,)))
    x = g.node("Conv", conv_in, kernel_shape=[p, p], strides=[p, p])
    x = g.node("Transpose", [g.node("Reshape", [x, g.const([0, D, -1])])], perm=[0, 2, 1])  # [B, n, D]
    cls = g.weight(spec.cls, w.get(spec.cls, numel=D), shape=(1, 1, D))
    x = g.node("Concat", [g.batch_expand(cls, pixels, (1, D)), x], axis=1)  # CLS first
    pos = w.get(spec.positions, numel=(n + 1) * D)  # [n + 1, D], or timm's [1, n + 1, D]
    x = g.node("Add", [x, g.weight(spec.positions, pos.reshape(n + 1, D))])
    del pos  # streamed: not held while the blocks are written
    if spec.pre_norm:
        x = _layer_norm(g, w, x, spec.pre_norm[0], spec.pre_norm[1], D, spec.layer_norm_eps)
    states = [x]
    for i in range(max(layers)):
        states.append(_vit_block(g, w, spec, i, states[-1]))
    if spec.post_norm is not None:
        states[-1] = _layer_norm(g, w, states[-1], spec.post_norm[0], spec.post_norm[1], D, spec.layer_norm_eps)
    feats = [states[j] for j in layers]
    x = g.node("Concat", feats, axis=-1) if len(feats) > 1 else feats[0]
    if not spec.keep_cls:
        x = g.node("Slice", [x, g.const([1]), g.const([INT64_MAX]), g.const([1])])
    return x


class _ConnectorOps:
    """What a connector kind writes its graph with (models.connectors.ConnectorOps): weights
    by role, read through the spec and streamed into the graph."""

    def __init__(self, g: GraphBuilder, w: _Weights, spec: ConnectorSpec):
        self.g, self.w, self.spec, self.weights = g, w, spec, dict(spec.weights)

    def _role(self, name: str) -> str:
        if name not in self.weights:
            raise ConfigError(f"connector kind {self.spec.kind!r} needs a {name!r} weight; the part spec names "
                              f"only {sorted(self.weights)}")
        return self.weights[name]

    def linear(self, x: str, role: str, out_in: tuple[int | None, int | None]) -> str:
        return _linear(self.g, self.w, x, self._role(role), out_in, self.weights.get(f"{role}_bias", ()))

    def layer_norm(self, x: str, role: str, dim: int, eps: float) -> str:
        return _layer_norm(self.g, self.w, x, self._role(role), self.weights.get(f"{role}_bias"), dim, eps)

    def activation(self, x: str, name: str) -> str:
        return self.g.activation(x, name)

    def silu(self, x: str) -> str:
        return self.g.silu(x)

    def mul(self, a: str, b: str) -> str:
        return self.g.node("Mul", [a, b])

    def add(self, a: str, b: str) -> str:
        return self.g.node("Add", [a, b])

    def parameter(self, role: str, shape: tuple[int, ...], like: str) -> str:
        name = self._role(role)
        numel = 1
        for d in shape:
            numel *= d
        t = self.g.weight(name, self.w.get(name, numel=numel), shape=(1, *shape))
        return self.g.batch_expand(t, like, shape)

    def attention(self, q: str, k: str, v: str, num_heads: int, head_dim: int) -> str:
        g = self.g
        heads = [g.split_heads(t, num_heads, head_dim) for t in (q, k, v)]
        return g.merge_heads(g.sdpa(*heads, head_dim, softmax_fp32=True), num_heads * head_dim)

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.g.node("Reshape", [x, self.g.const(list(shape))])

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.g.node("Transpose", [x], perm=list(perm))

    def slice(self, x: str, starts: list[int], ends: list[int], axes: list[int]) -> str:
        return self.g.node("Slice", [x, self.g.const(starts), self.g.const(ends), self.g.const(axes)])

    def concat(self, xs: list[str], axis: int) -> str:
        return self.g.node("Concat", xs, axis=axis) if len(xs) > 1 else xs[0]

    def for_spec(self, spec: ConnectorSpec) -> "_ConnectorOps":
        """The same graph, weights read through another (sub-connector's) spec."""
        return _ConnectorOps(self.g, self.w, spec)


def export_connector(tensors: TensorSource, spec: ConnectorSpec, vision_width: int, hidden_size: int,
                     out_path: str | os.PathLike, precision: str = "fp32",
                     num_tokens: int | None = None) -> ExportedGraph:
    """Write the connector as ``out_path`` + ``out_path.data`` (weights streamed).

    ``image_features`` [num_images, T, vision_width] -> ``image_embeds``
    [num_images, T' + (boi) + (eoi), hidden_size] with T' the kind's count (T; fewer for a kind
    that merges tokens; a resampler's fixed number of queries: ``output_axis``). ``num_tokens``
    fixes T (what a TensorRT engine prefers); None leaves it a named dynamic axis
    ``vision_tokens``, unless the kind needs a fixed T (``input_tokens``).
    """
    kind = get_connector(spec.kind)
    w = _Weights(tensors, "connector")
    if num_tokens is None:  # a kind that folds a fixed grid (pixel shuffle) fixes T itself
        num_tokens = kind.input_tokens(spec)
    tokens: int | str = num_tokens if num_tokens is not None else "vision_tokens"
    out_tokens = kind.output_axis(spec, tokens)
    hidden_size = kind.output_width(spec, hidden_size)
    with GraphBuilder(out_path, "connector", precision) as g:
        feats = g.input("image_features", (NUM_IMAGES, tokens, vision_width))
        x = kind.onnx(_ConnectorOps(g, w, spec), spec, feats, vision_width, hidden_size)
        around = []
        for name in (spec.boi, spec.eoi):
            if name is not None:
                t = g.weight(name, w.get(name, numel=hidden_size), shape=(1, 1, hidden_size))
                around.append(g.batch_expand(t, feats, (1, hidden_size)))
        if around:
            parts = ([around[0]] if spec.boi is not None else []) + [x] + ([around[-1]] if spec.eoi is not None else [])
            x = g.node("Concat", parts, axis=1)
        g.output(x, "image_embeds", (NUM_IMAGES, out_tokens, hidden_size))
        return g.finish({"part": "connector", "precision": precision})
