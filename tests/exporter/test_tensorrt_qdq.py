"""INT8 / INT4 weights of the TensorRT-profile decoder.

- INT4 packing is ONNX's (checked with onnx's reference evaluator, not onnxruntime).
- The graphs dequantize exactly: onnxruntime (``qdq_matmulnbits_accuracy_level=0``) on the
  quantized fp32-activation graph equals PyTorch with the same dequantized weights (1e-4).
- Structure: signed INT4 with 2-D block scales and no zero point at opset 21, INT8 per
  channel at opset 19, LM head INT8; both pass the TensorRT audit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from arch_params import tensorrt_archs
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import export_token_embedding
from vlmexport.exporter.onnx_vision import (
    export_connector,
    export_vision_encoder,
)
from vlmexport.exporter.tensorrt_audit import TARGETS, audit_model
from vlmexport.exporter.tensorrt_decoder import export_tensorrt_decoder
from vlmexport.exporter.tensorrt_qdq import (
    pack_int4,
    quantize_int4_blocks,
    quantize_int8_columns,
    quantized_builder,
)
from vlmexport.runtimes.torch_session import TorchSession
from vlmexport.runtimes.tensorrt_profile import (
    OrtProfileExecutor,
    ProfileFiles,
    StaticCacheSession,
)


def test_int4_packing_is_onnx_packing():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 6)).astype(np.float32)
    codes, scale = quantize_int4_blocks(w, 32)
    assert codes.min() >= -8 and codes.max() <= 7 and scale.shape == (2, 6)
    t = TensorProto(name="w", data_type=TensorProto.INT4, dims=[64, 6], raw_data=pack_int4(codes))
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0, block_size=32)
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 6])],
                          initializer=[t, numpy_helper.from_array(scale, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    (y,) = ReferenceEvaluator(m).run(None, {})
    np.testing.assert_array_equal(y, codes.astype(np.float32) * np.repeat(scale, 32, axis=0))
    assert np.abs(y - w).max() <= np.repeat(scale, 32, axis=0).max() / 2 + 1e-6  # round to nearest
    c8, s8 = quantize_int8_columns(w)
    assert np.abs(c8.astype(np.float32) * s8 - w).max() <= s8.max() / 2 + 1e-6


def _dequantized_model(model, quant: str, block: int):
    """A copy of ``model`` whose decoder projections hold exactly the weights the graph dequantizes."""
    import copy

    spec = type(model).part_specs(model.config).decoder
    q = copy.deepcopy(model)
    state = q.state_dict()
    experts = [spec.language] + ([spec.vision] if spec.vision else [])
    names = []
    for i in range(spec.num_layers):
        for e in experts:
            for role in ("qkv", "o", "gate", "up", "down"):
                n = getattr(e, role)
                names += [x.format(i=i) for x in ((n,) if isinstance(n, str) else n)]
    for name in names + [spec.lm_head]:
        w = state[name].float().numpy().T  # [in, out]
        if quant == "int4" and name != spec.lm_head and w.shape[0] % block == 0:
            codes, scale = quantize_int4_blocks(w, block)
            deq = codes.astype(np.float32) * np.repeat(scale, block, axis=0)
        else:
            codes, scale = quantize_int8_columns(w)
            deq = codes.astype(np.float32) * scale
        state[name] = torch.from_numpy(np.ascontiguousarray(deq.T))
    q.load_state_dict(state)
    return q.eval()


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("arch", tensorrt_archs())
def test_dequantizes_exactly(tiny_model, tmp_path, arch, quant):
    model = tiny_model(arch, jitter=True)
    specs = type(model).part_specs(model.config)
    t = StateDictTensors(model)
    block = 32
    g = export_tensorrt_decoder(t, specs.decoder, tmp_path / "td.onnx", "fp32", builder=quantized_builder(quant, block),
                                quant_precision=quant)
    export_token_embedding(t, specs.decoder, tmp_path / "emb.safetensors", "fp32")
    export_vision_encoder(t, specs.vision, tmp_path / "ve.onnx", "fp32")
    export_connector(t, specs.connector, specs.vision.output_width, specs.decoder.hidden_size,
                     tmp_path / "co.onnx", "fp32")
    s = specs.decoder
    files = ProfileFiles(g.path, tmp_path / "emb.safetensors", tmp_path / "ve.onnx", tmp_path / "co.onnx",
                         g.decode_path)
    sess = StaticCacheSession(OrtProfileExecutor(files, s.num_layers, s.num_kv_heads, s.head_dim, 96, threads=1),
                              files.token_embedding, s.hidden_size, s.vocab_size)
    ref = TorchSession(_dequantized_model(model, quant, block))
    plain = TorchSession(model)
    c = model.config
    lay = build_layout([TextPiece((1, 5)), ImagePiece(model.image_tokens()), TextPiece((7, 8, 9))], c.expert_routing,
                       c.position_ids, image_pad_id=c.pad_token_id)
    emb = np.random.default_rng(0).standard_normal((1, model.image_tokens(), s.hidden_size)).astype(np.float32)
    got, want, orig = sess.prefill(lay, emb), ref.prefill(lay, emb), plain.prefill(lay, emb)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - orig).max() > 1e-4  # the weights really are quantized
    for k, tok in enumerate((5, 6)):
        np.testing.assert_allclose(sess.decode(tok, lay.next_position + k), ref.decode(tok, lay.next_position + k),
                                   atol=1e-4)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_graph_structure_and_audit(tiny_model, tmp_path, quant):
    model = tiny_model("cogvlm")
    spec = type(model).part_specs(model.config).decoder
    g = export_tensorrt_decoder(StateDictTensors(model), spec, tmp_path / "td.onnx", "fp16",
                                builder=quantized_builder(quant, 32), quant_precision=quant)
    m = onnx.load(str(g.path), load_external_data=False)
    assert m.opset_import[0].version == (21 if quant == "int4" else 19)
    inits = {t.name: t for t in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(len(n.input) == 2 for n in dqs)  # no zero point
    blocked = [n for n in dqs if any(a.name == "block_size" for a in n.attribute)]
    if quant == "int4":
        assert len(blocked) == len(dqs) - 1  # all but the LM head
        for n in blocked:
            w, sc = inits[n.input[0]], inits[n.input[1]]
            assert w.data_type == TensorProto.INT4 and len(sc.dims) == 2 and sc.dims[0] * 32 == w.dims[0]
        assert inits["lm_head.weight.int8"].data_type == TensorProto.INT8
    else:
        assert not blocked and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in dqs)
    assert not [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    for path in (g.path, g.decode_path):
        for t in TARGETS:
            assert audit_model(path, t).ok
