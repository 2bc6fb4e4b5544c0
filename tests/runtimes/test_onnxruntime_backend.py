"""The onnxruntime backend (``OrtModelSession``) against the torch reference (``TorchSession``).

Generated from the registry: every architecture x routing/position semantics it accepts.

- prefill (two images) + decode steps equal ``TorchSession`` (fp32 1e-4, fp16 1e-2 of the
  logit scale), with and without the routing-free decode graph, and after ``reset``;
- greedy generation through ``Pipeline`` equals the torch pipeline token for token;
- the KV buffers are updated in place (same data pointers, only the new slot changes);
- the vision ONNX files are wired pixel_values -> image_features -> image_embeds;
- the runtime module imports neither torch nor the model code.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
from arch_params import arch_semantics
import torch
from onnx import TensorProto, helper

from vlmexport.core.generation import GenerationConfig, generate_tokens
from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.core.prompt import Turn
from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import export_text_decoder, export_token_embedding
from vlmexport.models import architectures, get_architecture
from vlmexport.runtimes.torch_session import TorchSession
from vlmexport.runtimes import onnxruntime_backend as ob
from vlmexport.runtimes.onnxruntime_backend import OrtModelSession
from vlmexport.runtimes.spec import DecoderShape
from vlmexport.runtimes.pipeline import Pipeline
from vlmexport.runtimes.torch_backend import pipeline_from_model

ARCHS = sorted(architectures())
SEMANTICS = [("image_chunk", "sequential"), ("hf_cogvlm", "hf_cogvlm")]
ATOL = 1e-4
MAX_LEN = 128  # the longest tiny prompt (internvl's ChatML, 2 images) + 12 new tokens


# every (architecture, semantics) pair that the architecture's config accepts
ARCH_SEMANTICS = arch_semantics(SEMANTICS)


def export_session(model, out_dir, precision="fp32", decode_model=True, **kw) -> OrtModelSession:
    spec = type(model).part_specs(model.config).decoder
    src = StateDictTensors(model)
    g = export_text_decoder(src, spec, out_dir / f"text_decoder.{precision}.onnx", precision=precision,
                            decode_model=decode_model)
    emb = export_token_embedding(src, spec, out_dir / f"token_embedding.{precision}.safetensors", precision)
    facts = DecoderShape(**g.runtime_facts())
    kw.setdefault("vision_fallback", TorchSession(model, max_length=8).encode_images)
    return OrtModelSession(g.path, emb, facts, decode_path=g.decode_path, intra_op_num_threads=1,
                           max_length=MAX_LEN, **kw)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def layout_for(model, tail=(9, 10, 11)):
    n, c = model.image_tokens(), model.config
    pieces = [TextPiece((1, 5, 6)), ImagePiece(n), TextPiece((7, 8)), ImagePiece(n), TextPiece(tail)]
    return build_layout(pieces, c.expert_routing, c.position_ids, image_pad_id=c.pad_token_id)


STEPS = (12, 40, 41, 200, 3)


def assert_sessions_agree(ref, got, model, atol, steps=STEPS):
    lay = layout_for(model)
    px = pixels(2)
    expected = ref.prefill(lay, ref.encode_images(px))
    np.testing.assert_allclose(got.prefill(lay, got.encode_images(px)), expected, atol=atol, rtol=0)
    for i, tok in enumerate(steps):
        expected = ref.decode(tok, lay.next_position + i)
        np.testing.assert_allclose(got.decode(tok, lay.next_position + i), expected, atol=atol, rtol=0,
                                   err_msg=f"decode step {i}")


@pytest.mark.parametrize("decode_graph", [True, False], ids=["decode-graph", "routed-only"])
@pytest.mark.parametrize("arch, routing, positions", ARCH_SEMANTICS)
def test_session_equals_torch(tiny_model, tmp_path, arch, routing, positions, decode_graph):
    model = tiny_model(arch, seed=1, jitter=True, expert_routing=routing, position_ids=positions)
    sess = export_session(model, tmp_path, decode_model=decode_graph)
    assert (sess.decode_graph is not None) == (decode_graph and model.has_experts)
    ref = TorchSession(model, max_length=MAX_LEN)
    assert_sessions_agree(ref, sess, model, ATOL)
    # reset, then a shorter prompt reusing the buffers: stale slots must not leak in
    ref.reset()
    sess.reset()
    short = build_layout([TextPiece((1, 2)), ImagePiece(model.image_tokens()), TextPiece((4,))],
                         model.config.expert_routing, model.config.position_ids)
    px = pixels(1, seed=3)
    np.testing.assert_allclose(sess.prefill(short, sess.encode_images(px)), ref.prefill(short, ref.encode_images(px)),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_session(tiny_model, tmp_path, arch):
    model = tiny_model(arch, seed=2, jitter=True)
    sess = export_session(model, tmp_path, precision="fp16")
    assert sess.dtype == np.float16 and sess.embedding.dtype == np.float16
    assert {v.data_type() for v in sess.kv} == {"tensor(float16)"}
    ref = TorchSession(model, max_length=MAX_LEN)
    lay = layout_for(model)
    scale = np.abs(ref.prefill(lay, ref.encode_images(pixels(2)))).max()
    ref.reset()
    assert_sessions_agree(ref, sess, model, atol=1e-2 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_pipeline_generation_equals_torch(tiny_model, tmp_path, tokenizer, preprocess_config, images, arch):
    model = tiny_model(arch, seed=11, jitter=True)
    torch_pipe = pipeline_from_model(model, tokenizer, preprocess_config, max_length=MAX_LEN)
    sess = export_session(model, tmp_path)
    ort_pipe = Pipeline(sess, tokenizer, torch_pipe.template, preprocess_config,
                        replace(torch_pipe.spec, max_length=sess.max_length), backend="onnxruntime")
    prompt, imgs = "<image> What colour is <image>?", images[:2]
    cfg = GenerationConfig(max_new_tokens=12)  # no stop tokens: a tiny random model rarely stops
    tokens = []
    for pipe in (torch_pipe, ort_pipe):
        layout, px = pipe.prepare([Turn(user=prompt, images=2)], imgs)
        tokens.append(list(generate_tokens(pipe.session, layout, pipe.session.encode_images(px), cfg)))
    assert len(tokens[0]) == 12 and tokens[0] == tokens[1]
    assert ort_pipe.generate(prompt, imgs, max_new_tokens=12) == torch_pipe.generate(prompt, imgs, max_new_tokens=12)


def test_kv_buffers_are_updated_in_place(tiny_model, tmp_path):
    model = tiny_model("cogvlm", seed=3, jitter=True)
    sess = export_session(model, tmp_path)
    ptrs = [v.data_ptr() for v in sess.kv]
    lay = layout_for(model)
    sess.prefill(lay, sess.encode_images(pixels(2)))
    n = len(lay)
    assert sess.length == n
    before = sess.kv[0].numpy().copy()
    for i, tok in enumerate(STEPS):
        sess.decode(tok, lay.next_position + i)
        assert [v.data_ptr() for v in sess.kv] == ptrs
    after = sess.kv[0].numpy()
    assert after.shape == (1, model.config.num_key_value_heads, MAX_LEN, model.config.head_dim)
    np.testing.assert_array_equal(after[:, :, :n], before[:, :, :n])  # the prompt's slots are untouched
    assert (after[:, :, n:n + len(STEPS)] != before[:, :, n:n + len(STEPS)]).any(axis=(0, 1, 3)).all()
    np.testing.assert_array_equal(after[:, :, n + len(STEPS):], before[:, :, n + len(STEPS):])


def test_kv_buffers_grow_by_chunks_and_keep_what_they_hold(tiny_model, tmp_path, monkeypatch):
    """On a CPU the KV buffers start small and grow by KV_CHUNK positions as the sequence does
    (GQA's cost follows the buffer's length); the logits are those of a session whose buffers
    hold the whole context from the start, through the prompt and across two growths."""
    from vlmexport.runtimes import onnxruntime_backend as ob

    model = tiny_model("cogvlm", seed=3, jitter=True)
    lay = layout_for(model)
    emb = None
    runs = {}
    for chunk in (MAX_LEN, 16):
        monkeypatch.setattr(ob, "KV_CHUNK", chunk)
        sess = export_session(model, tmp_path / str(chunk))
        assert sess.kv_capacity == chunk
        emb = sess.encode_images(pixels(2)) if emb is None else emb
        out = [sess.prefill(lay, emb)]
        caps = [sess.kv_capacity]
        for i in range(40):
            out.append(sess.decode(5 + i, lay.next_position + i))
            caps.append(sess.kv_capacity)
        runs[chunk] = (out, caps)
        assert sess.kv[0].numpy().shape[2] == sess.kv_capacity
    n = len(lay)
    assert runs[16][1][0] == -(-n // 16) * 16 and runs[16][1][-1] == -(-(n + 40) // 16) * 16
    assert len(set(runs[16][1])) >= 3 and set(runs[MAX_LEN][1]) == {MAX_LEN}
    for a, b in zip(runs[MAX_LEN][0], runs[16][0]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_context_limits_and_image_count_errors(tiny_model, tmp_path):
    model = tiny_model("cogvlm", seed=4)
    sess = export_session(model, tmp_path)
    with pytest.raises(ValueError, match=f"context holds {MAX_LEN}"):
        sess.prefill(build_layout([TextPiece(tuple(range(1, MAX_LEN + 5)))]), None)
    lay = layout_for(model)
    with pytest.raises(ValueError, match="image positions but"):
        sess.prefill(lay, sess.encode_images(pixels(1)))
    with pytest.raises(ValueError, match="has 0 image positions but"):
        sess.prefill(build_layout([TextPiece((1, 2))]), sess.encode_images(pixels(1)))
    sess.prefill(build_layout([TextPiece(tuple(range(1, MAX_LEN)))]), None)
    sess.decode(5, MAX_LEN)
    with pytest.raises(ValueError, match="is full"):
        sess.decode(5, MAX_LEN + 1)


def _fake_vision_files(tmp_path, hidden: int):
    """vision_encoder.onnx: pixels [N,3,32,32] -> [N,4,768]; connector.onnx: -> [N,4,hidden] (a MatMul)."""
    w = np.random.default_rng(0).standard_normal((768, hidden)).astype(np.float32)
    venc = helper.make_graph(
        [helper.make_node("Reshape", ["pixel_values", "shape"], ["image_features"])], "vision_encoder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["n", 4, 768])],
        [onnx.numpy_helper.from_array(np.array([0, 4, 768], np.int64), "shape")])
    conn = helper.make_graph(
        [helper.make_node("MatMul", ["image_features", "w"], ["image_embeds"])], "connector",
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["n", 4, 768])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["n", 4, hidden])],
        [onnx.numpy_helper.from_array(w, "w")])
    paths = []
    for name, g in (("vision_encoder", venc), ("connector", conn)):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
        paths.append(tmp_path / f"{name}.onnx")
    return paths, w


def test_vision_onnx_files_are_chained(tiny_model, tmp_path):
    model = tiny_model("cogvlm")
    (venc, conn), w = _fake_vision_files(tmp_path, model.config.hidden_size)
    sess = export_session(model, tmp_path, vision_encoder_path=venc, connector_path=conn, vision_fallback=None)
    px = pixels(2)
    np.testing.assert_allclose(sess.encode_images(px), px.reshape(2, 4, 768) @ w, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="both vision_encoder_path and connector_path"):
        export_session(model, tmp_path / "x", vision_encoder_path=venc, vision_fallback=None)
    no_vision = export_session(model, tmp_path, vision_fallback=None)
    with pytest.raises(RuntimeError, match="vision_fallback"):
        no_vision.encode_images(px)


def test_providers_threads_and_facts(monkeypatch):
    monkeypatch.setattr(ob.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ob.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ob.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert ob.default_providers() == ["CPUExecutionProvider"]
    import os

    assert 1 <= ob.physical_cores() <= (os.cpu_count() or 1)
    assert ob.session_options().intra_op_num_threads == ob.physical_cores()
    with pytest.raises(ValueError, match="max_length must be positive"):
        DecoderShape(2, 2, 16, 64, 320, 0)


def test_runtime_imports_neither_torch_nor_models():
    code = ("import sys, vlmexport.runtimes.onnxruntime_backend; "
            "bad = [m for m in ('torch', 'vlmexport.models', 'vlmexport.exporter') if m in sys.modules]; "
            "sys.exit(repr(bad) if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
