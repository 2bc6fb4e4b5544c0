"""Calibration feeds of a cross-attending decoder: the image goes in as memory, not as rows.

GPTQ (the default int4 algorithm) runs the fp32 decoder graph on ``decoder_feeds``; for a
decoder that cross-attends, a feed must carry ``cross_attention_memory`` and ``media`` and
leave the placeholder's token embedding in place, and running the graph on it must give
the torch model's logits (so the statistics are those of the real activations).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from arch_params import cross_attending

from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import export_text_decoder
from vlmexport.models import architectures
from vlmexport.quant.calib import CalibrationSet, decoder_feeds
from vlmexport.runtimes.spec import DecoderShape

ARCHS = [a for a in sorted(architectures()) if cross_attending(a)]


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_feeds_carry_the_image_as_memory(arch, tiny_model, tmp_path):
    model = tiny_model(arch, seed=5, jitter=True)
    spec = type(model).part_specs(model.config).decoder
    g = export_text_decoder(StateDictTensors(model), spec, tmp_path / "td.onnx", max_length=64)
    layouts = [build_layout([TextPiece((1, 9)), ImagePiece(model.image_tokens()), TextPiece(tuple(range(10, 10 + k)))],
                            image_pad_id=model.image_placeholder_id(), image_placement=model.image_placement)
               for k in (3, 5)]
    cat = lambda f, dt: np.concatenate([np.asarray(f(lo), dt) for lo in layouts])  # noqa: E731
    size = model.config.vision_config.image_size
    px = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    cs = CalibrationSet(px, cat(lambda lo: lo.input_ids, np.int64), cat(lambda lo: lo.position_ids, np.int64),
                        cat(lambda lo: lo.token_type, np.int64), cat(lambda lo: lo.is_image, bool),
                        np.cumsum([0] + [len(lo) for lo in layouts]), "k", "test",
                        media=cat(lambda lo: lo.media, np.int64))
    table = model.token_embedding().weight.detach().numpy()
    encode = lambda p: model.image_embeddings(torch.from_numpy(p)).detach().numpy()  # noqa: E731
    feeds = list(decoder_feeds(cs, table, encode, DecoderShape(**g.runtime_facts())))
    sess = ort.InferenceSession(str(g.path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    for i, (f, lo) in enumerate(zip(feeds, layouts)):
        assert {"cross_attention_memory", "media"} <= set(f)
        np.testing.assert_array_equal(f["media"][0], lo.media)
        logits = sess.run(["logits"], {k: v for k, v in f.items() if k in names})[0][0, -1]
        with torch.no_grad():
            ids = torch.as_tensor(lo.input_ids)[None]
            expected = model(ids, torch.as_tensor(lo.position_ids)[None], None, None,
                             torch.from_numpy(px[i:i + 1]))[0, -1].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
