"""The TensorRT-profile decoder, run with onnxruntime against the PyTorch reference.

Generated from the registry (every architecture x routing/position semantics its tiny
config accepts) x fp32/fp16:

- Parity: a two-image prompt, then decode steps, equals ``TorchSession`` (fp32 1e-4;
  fp16 within 1e-2 of the logit scale); the vision parts through the same session.
- Static KV buffer: a prompt prefilled in two chunks (write_index > 0, a causal mask
  inside the second chunk) equals one prefill; after ``reset`` a shorter prompt ignores
  the stale slots of the longer one.
- Routing: perturbing the visual expert changes the logits only when image positions
  exist; the decode graph holds no visual-expert weight.
- The graphs use the default ONNX domain only and pass the TensorRT 10.3 / 10.15 audit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from arch_params import arch_semantics, cross_attending, tensorrt_archs

from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import export_token_embedding
from vlmexport.exporter.onnx_vision import (
    export_connector,
    export_vision_encoder,
)
from vlmexport.exporter.tensorrt_audit import TARGETS, audit_model
from vlmexport.exporter.tensorrt_decoder import export_tensorrt_decoder
from vlmexport.models import architectures
from vlmexport.runtimes.torch_session import TorchSession
from vlmexport.runtimes.tensorrt_profile import (
    OrtProfileExecutor,
    ProfileFiles,
    StaticCacheSession,
)

SEMANTICS = [("image_chunk", "sequential"), ("hf_cogvlm", "hf_cogvlm")]
ARCH_SEMANTICS = [p for p in arch_semantics(SEMANTICS) if p.values[0] in tensorrt_archs()]
EXPERT_ARCHS = sorted(n for n, A in architectures().items() if A.has_experts)
ATOL = 1e-4
FP16_RTOL = 1e-2
CAPACITY = 96


def export_all(model, d, precision="fp32"):
    specs = type(model).part_specs(model.config)
    t = StateDictTensors(model)
    g = export_tensorrt_decoder(t, specs.decoder, d / "text_decoder.onnx", precision)
    export_token_embedding(t, specs.decoder, d / "emb.safetensors", precision)
    export_vision_encoder(t, specs.vision, d / "ve.onnx", precision)
    export_connector(t, specs.connector, specs.vision.output_width, specs.decoder.hidden_size, d / "co.onnx",
                     precision)
    return g, ProfileFiles(g.path, d / "emb.safetensors", d / "ve.onnx", d / "co.onnx", g.decode_path)


def session(model, g, files, capacity=CAPACITY) -> StaticCacheSession:
    s = type(model).part_specs(model.config).decoder
    ex = OrtProfileExecutor(files, s.num_layers, s.num_kv_heads, s.head_dim, capacity, threads=1)
    return StaticCacheSession(ex, files.token_embedding, s.hidden_size, s.vocab_size)


def layout(model, tail=(9, 10, 11), images=2):
    n = model.image_tokens()
    c = model.config
    pieces = [TextPiece((1, 5, 6))]
    for _ in range(images):
        pieces += [ImagePiece(n), TextPiece((7, 8))]
    pieces.append(TextPiece(tail))
    return build_layout(pieces, c.expert_routing, c.position_ids, image_pad_id=c.pad_token_id)


def pixels(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("arch,routing,positions", ARCH_SEMANTICS)
def test_parity_with_pytorch(tiny_model, tmp_path, arch, routing, positions, precision):
    model = tiny_model(arch, jitter=True, expert_routing=routing, position_ids=positions)
    g, files = export_all(model, tmp_path, precision)
    sess, ref = session(model, g, files), TorchSession(model)
    px = pixels()
    emb_ref = ref.encode_images(px)
    emb = sess.encode_images(px)
    scale = float(np.abs(emb_ref).max())
    assert np.abs(emb - emb_ref).max() <= (ATOL if precision == "fp32" else FP16_RTOL * scale)
    lay = layout(model)
    got, want = [sess.prefill(lay, emb_ref)], [ref.prefill(lay, emb_ref)]
    pos = lay.next_position
    for tok in (5, 6, 7, 8):
        got.append(sess.decode(tok, pos))
        want.append(ref.decode(tok, pos))
        pos += 1
    for a, b in zip(got, want):
        tol = ATOL if precision == "fp32" else FP16_RTOL * float(np.abs(want[0]).max())
        assert np.abs(a - b).max() <= tol, (precision, np.abs(a - b).max())
        assert a.argmax() == b.argmax()


@pytest.mark.parametrize("arch", tensorrt_archs())
def test_chunked_prefill_and_stale_slots(tiny_model, tmp_path, arch):
    """write_index > 0 with several new positions: the causal mask inside the chunk and the
    scatter at the right slots; after reset, stale slots beyond the new length are invisible."""
    model = tiny_model(arch, jitter=True)
    g, files = export_all(model, tmp_path)
    sess = session(model, g, files)
    lay = layout(model, images=1)
    emb = np.random.default_rng(3).standard_normal((1, model.image_tokens(), model.config.hidden_size))
    whole = sess.prefill(lay, emb.astype(np.float32))
    # the same prompt as two executor steps: positions [0, k) then [k, n)
    ex, k = sess.executor, len(lay) - 4
    e = np.take(sess.embedding, lay.input_ids, axis=0).astype(ex.dtype)
    e[lay.is_image] = emb.reshape(-1, e.shape[1])
    ex.step(e[None, :k], lay.position_ids[None, :k], lay.token_type[None, :k], 0)
    chunked = ex.step(e[None, k:], lay.position_ids[None, k:], lay.token_type[None, k:], k)
    np.testing.assert_allclose(chunked, whole, atol=ATOL)
    # a shorter prompt after reset: same logits as a fresh session (stale slots k.. are masked)
    short = build_layout([TextPiece((1, 5, 6, 7))], model.config.expert_routing, model.config.position_ids)
    sess.reset()
    again = sess.prefill(short, None)
    fresh = session(model, g, files).prefill(short, None)
    np.testing.assert_allclose(again, fresh, atol=1e-6)
    assert ex.current in (0, 1)


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
def test_routing_by_token_type(tiny_model, tmp_path, arch):
    model = tiny_model(arch, jitter=True)
    perturbed = tiny_model(arch, jitter=True)
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if "vision_expert" in name or ".vision_" in name:
                p.mul_(1.5)
    changed = [n for n, p in perturbed.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert changed, "no visual-expert parameter found to perturb"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ga, fa = export_all(model, tmp_path / "a")
    gb, fb = export_all(perturbed, tmp_path / "b")
    sa, sb = session(model, ga, fa), session(perturbed, gb, fb)
    text = build_layout([TextPiece((1, 5, 6, 7, 8))], model.config.expert_routing, model.config.position_ids)
    np.testing.assert_allclose(sa.prefill(text, None), sb.prefill(text, None), atol=1e-6)
    lay = layout(model, images=1)
    emb = np.random.default_rng(0).standard_normal((1, model.image_tokens(), model.config.hidden_size))
    assert np.abs(sa.prefill(lay, emb.astype(np.float32)) - sb.prefill(lay, emb.astype(np.float32))).max() > 1e-3
    decode = onnx.load(str(ga.decode_path), load_external_data=False)
    assert not [i for i in decode.graph.initializer if ".vision." in i.name]
    assert "token_type" not in {i.name for i in decode.graph.input}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("arch", tensorrt_archs())
def test_graphs_pass_the_tensorrt_audit(tiny_model, tmp_path, arch, precision):
    model = tiny_model(arch)
    g, files = export_all(model, tmp_path, precision)
    for path in [p for p in (g.path, g.decode_path, files.vision_encoder, files.connector) if p is not None]:
        m = onnx.load(str(path), load_external_data=False)
        assert {n.domain for n in m.graph.node} <= {""}
        assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
        for t in TARGETS:
            r = audit_model(path, t)
            assert r.ok, (path.name, t, [str(f) for f in r.findings])
    ops = {n.op_type for n in onnx.load(str(g.path), load_external_data=False).graph.node}
    assert {"ScatterND", "Softmax", "MatMul", "ReduceMean"} <= ops
    assert not ops & {"NonZero", "GroupQueryAttention", "RotaryEmbedding", "Attention", "RMSNormalization"}


def test_kv_buffer_io_is_static(tiny_model, tmp_path):
    model = tiny_model("cogvlm")
    g, _ = export_all(model, tmp_path)
    ins = {t.name: t for t in g.inputs}
    outs = {t.name: t for t in g.outputs}
    s = type(model).part_specs(model.config).decoder
    assert ins["past_key_values.0.key"].shape == ("batch", s.num_kv_heads, "kv_capacity", s.head_dim)
    assert outs["present.0.key"].shape == ins["past_key_values.0.key"].shape  # updated in place, never grows
    assert ins["write_index"].shape == (1,) and ins["write_index"].dtype == "int64"


@pytest.mark.parametrize("arch", [a for a in sorted(architectures()) if cross_attending(a)])
def test_cross_attending_decoder_is_refused_with_one_line(tiny_model, tmp_path, arch):
    from vlmexport.core.errors import ConfigError

    model = tiny_model(arch)
    with pytest.raises(ConfigError, match="TensorRT profile: .*cross-attention") as err:
        export_tensorrt_decoder(StateDictTensors(model), type(model).part_specs(model.config).decoder,
                                tmp_path / "td.onnx", "fp16")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_last_layer_runs_the_last_position_only(tiny_model, tmp_path):
    """Once the last layer's keys and values are written, its output projection and both experts'
    MLPs see one position per row; the layers before it see every position."""
    import onnxruntime as ort

    model = tiny_model("cogvlm", jitter=True)
    g, _ = export_all(model, tmp_path)
    s = type(model).part_specs(model.config).decoder
    m = onnx.load(str(g.path))
    last = s.num_layers - 1
    wanted = {f"layers.{i}.{blk}.route" for i in (0, last) for blk in ("o", "mlp")}
    probes = {n.name: n.output[0] for n in m.graph.node if n.name in wanted}
    assert last > 0 and set(probes) == wanted, (last, sorted(probes))  # two layers at least, both routed
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(v) for v in probes.values())
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    lay = layout(model, images=1)
    n = len(lay)
    kv = np.zeros((1, s.num_kv_heads, CAPACITY, s.head_dim), np.float32)
    feeds = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, n, s.hidden_size)).astype(np.float32),
             "position_ids": lay.position_ids[None], "token_type": lay.token_type[None],
             "write_index": np.array([0], np.int64),
             **{f"past_key_values.{i}.{k}": kv for i in range(s.num_layers) for k in ("key", "value")}}
    outs = dict(zip(probes, sess.run(list(probes.values()), feeds)))
    for blk in ("o", "mlp"):
        assert outs[f"layers.0.{blk}.route"].shape == (1, n, s.hidden_size)
        assert outs[f"layers.{last}.{blk}.route"].shape == (1, 1, s.hidden_size)


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
def test_prompt_ending_in_an_image_routes_its_last_position_to_the_visual_expert(tiny_model, tmp_path, arch):
    """The last layer's trimmed position keeps its own expert: a prompt whose last position is an
    image token (every other test prompt ends in text) equals the reference."""
    model = tiny_model(arch, jitter=True)
    g, files = export_all(model, tmp_path)
    c = model.config
    lay = build_layout([TextPiece((1, 5, 6)), ImagePiece(model.image_tokens())], c.expert_routing, c.position_ids,
                       image_pad_id=c.pad_token_id)
    assert lay.token_type[-1] == 1
    emb = np.random.default_rng(1).standard_normal((1, model.image_tokens(), c.hidden_size)).astype(np.float32)
    got, want = session(model, g, files).prefill(lay, emb), TorchSession(model).prefill(lay, emb)
    assert np.abs(got - want).max() <= ATOL
