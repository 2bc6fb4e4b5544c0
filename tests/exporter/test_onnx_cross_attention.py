"""A cross-attending ``text_decoder`` graph (``DecoderSpec.cross_attention``) against PyTorch.

Every architecture whose part spec has gated cross-attention blocks: the exported graph,
run through the onnxruntime session (memory and ``media`` inputs, KV cache bound in place),
must give the torch session's logits on a prompt with text before the first image, two
interleaved images, then greedy decode steps; and a prompt without an image must give the
language model's logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmexport.core.layout import ImagePiece, ImagePlacement, TextPiece, build_layout
from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import export_text_decoder, export_token_embedding
from vlmexport.models import architectures
from vlmexport.runtimes.onnxruntime_backend import OrtModelSession
from vlmexport.runtimes.spec import DecoderShape
from vlmexport.runtimes.torch_session import TorchSession


def _cross_archs() -> list[type]:
    return sorted((a for a in architectures().values() if a.image_placement == ImagePlacement.CROSS_ATTEND.value),
                  key=lambda a: a.arch_name)


def _open_gates(model, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.add_(0.6)
    return model.eval()


def _sessions(A, tmp_path, precision="fp32", **overrides):
    from vlmexport.models.base import seeded_init

    model = _open_gates(seeded_init(A(A.tiny_config(**overrides)), 0))
    spec = A.part_specs(model.config).decoder
    g = export_text_decoder(StateDictTensors(model), spec, tmp_path / "text_decoder.onnx", precision, max_length=64)
    emb = export_token_embedding(StateDictTensors(model), spec, tmp_path / "embed.safetensors", precision)
    ort_s = OrtModelSession(g.path, emb, DecoderShape(**g.runtime_facts()),
                            vision_fallback=lambda px: model.image_embeddings(torch.from_numpy(px)).detach().numpy())
    return model, TorchSession(model, max_length=64), ort_s


def _layout(model, n_images: int):
    tok = model.image_placeholder_id()
    pieces = [TextPiece((1, 7, 8))]
    for i in range(n_images):
        pieces += [ImagePiece(model.image_tokens()), TextPiece((20 + i, 21, 22))]
    return build_layout(pieces, image_pad_id=tok, image_placement=model.image_placement)


def _run(session, layout, pixels, steps=5):
    embeds = session.encode_images(pixels) if pixels is not None else None
    logits = [session.prefill(layout, embeds)]
    pos = layout.next_position
    for k in range(steps):
        logits.append(session.decode(int(np.argmax(logits[-1])), pos + k))
    return np.stack(logits)


@pytest.mark.parametrize("A", _cross_archs(), ids=lambda a: a.arch_name)
def test_ort_decoder_equals_torch_with_two_images_then_decode(A, tmp_path):
    model, ref, got = _sessions(A, tmp_path, num_hidden_layers=4, cross_layer_interval=2)
    size = model.config.vision_config.image_size
    px = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    layout = _layout(model, 2)
    expected, actual = _run(ref, layout, px), _run(got, layout, px)
    assert np.abs(actual - expected).max() <= 1e-4
    # the images and the media routing are live: another second image changes the tail's logits
    other = px.copy()
    other[1] = -other[1]
    assert np.abs(_run(got, layout, other)[0] - expected[0]).max() > 1e-3
    # no image: the graph's gate closes every cross-attention, as torch's
    text = build_layout([TextPiece((1, 7, 8, 9))])
    np.testing.assert_allclose(_run(got, text, None, 2), _run(ref, text, None, 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("A", _cross_archs(), ids=lambda a: a.arch_name)
def test_fp16_graph_stays_finite_and_close(A, tmp_path):
    model, ref, got = _sessions(A, tmp_path, precision="fp16")
    size = model.config.vision_config.image_size
    px = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    layout = _layout(model, 1)
    actual = _run(got, layout, px, steps=2)
    assert np.isfinite(actual).all()
    assert np.abs(actual - _run(ref, layout, px, steps=2)).max() <= 5e-2


@pytest.mark.parametrize("A", _cross_archs(), ids=lambda a: a.arch_name)
def test_vision_and_resampler_graphs_give_the_keys_values_torch_gives(A, tmp_path):
    """The connector graph (here a resampler plus every block's key/value projections) equals torch."""
    import onnxruntime as ort

    from vlmexport.exporter.onnx_vision import export_connector, export_vision_encoder
    from vlmexport.models.base import seeded_init

    model = _open_gates(seeded_init(A(A.tiny_config(num_hidden_layers=4, cross_layer_interval=2)), 0))
    specs = A.part_specs(model.config)
    src = StateDictTensors(model)
    ve = export_vision_encoder(src, specs.vision, tmp_path / "ve.onnx")
    cn = export_connector(src, specs.connector, specs.vision.output_width, specs.decoder.hidden_size,
                          tmp_path / "cn.onnx")
    size = specs.vision.image_size
    px = np.random.default_rng(2).standard_normal((2, 3, size, size)).astype(np.float32)
    feats = ort.InferenceSession(str(ve.path)).run(None, {"pixel_values": px})[0]
    got = ort.InferenceSession(str(cn.path)).run(None, {"image_features": feats})[0]
    with torch.no_grad():
        expected = model.image_embeddings(torch.from_numpy(px)).numpy()
    assert got.shape == expected.shape == (2, specs.decoder.cross_attention.memory_tokens,
                                           specs.decoder.cross_attention.memory_width)
    assert np.abs(got - expected).max() <= 1e-4
