"""The text-decoder ONNX export, run with onnxruntime against the PyTorch reference.

Generated from the registry: every architecture x routing/position semantics it accepts.

- Parity: a prompt with two images, then decode steps, equals ``model.decode`` with a KV
  cache (fp32 1e-4; fp16 within 1e-2 of the logit scale), for the routed graph and the
  routing-free decode graph.
- Routing: visual-expert Gemms are fed by Gathers of the ``token_type == 1`` rows only
  (graph structure and row counts at run time), and perturbing one expert's weights only
  changes the logits when that expert has positions.
- IO names / dtypes / dynamic axes; batch 1 and 2 with different prompt lengths.
- The KV cache is updated in place when past and present are bound to one buffer.
- Exporting from a saved checkpoint directory is byte-identical to exporting from the
  in-memory model, and holds at most one checkpoint tensor at a time.
"""

from __future__ import annotations

import copy
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from arch_params import arch_semantics
import torch

from vlmexport.core.names import DECODER_ALL_ROWS
from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import IOSpec, export_text_decoder, export_token_embedding
from vlmexport.models import architectures, get_architecture
from vlmexport.models.checkpoint import SafetensorsCheckpoint

ARCHS = sorted(architectures())
EXPERT_ARCHS = sorted(n for n, A in architectures().items() if A.has_experts)
SEMANTICS = [("image_chunk", "sequential"), ("hf_cogvlm", "hf_cogvlm")]
ATOL = 1e-4
FP16_RTOL = 1e-2  # of the fp32 logit scale (max |logit|)


# every (architecture, semantics) pair that the architecture's config accepts
ARCH_SEMANTICS = arch_semantics(SEMANTICS)


def spec_of(model):
    return type(model).part_specs(model.config).decoder


def export(model, path, **kw):
    return export_text_decoder(StateDictTensors(model), spec_of(model), path, **kw)


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def two_image_layout(model, tail=(9, 10, 11)):
    n = model.image_tokens()
    c = model.config
    pieces = [TextPiece((1, 5, 6)), ImagePiece(n), TextPiece((7, 8)), ImagePiece(n), TextPiece(tail)]
    return build_layout(pieces, c.expert_routing, c.position_ids, image_pad_id=model.image_placeholder_id(),
                        image_placement=model.image_placement)


def image_memory(model, n_images=2, seed=5) -> np.ndarray | None:
    """Random cross-attention memory for a decoder that cross-attends to its images (None: it splices them)."""
    x = spec_of(model).cross_attention
    if x is None:
        return None
    return np.random.default_rng(seed).standard_normal((1, n_images * x.memory_tokens, x.memory_width)).astype(
        np.float32)


def cross_of(model, memory, media):
    if memory is None:
        return None
    return model.cross_attention(torch.from_numpy(memory).reshape(-1, spec_of(model).cross_attention.memory_tokens,
                                                                  memory.shape[-1]), torch.as_tensor(media))


def prompt_embeds(model, layout, seed=0) -> np.ndarray:
    """Token embeddings with random image embeddings in the image positions: [1, S, H] float32."""
    with torch.no_grad():
        emb = model.embed(torch.as_tensor(layout.input_ids)[None])[0].numpy().copy()
    rng = np.random.default_rng(seed)
    emb[layout.is_image] = rng.standard_normal((int(layout.is_image.sum()), emb.shape[1])).astype(np.float32)
    return emb[None]


class GraphRunner:
    """Runs an exported decoder with plain ``run`` (presents fed back as the next pasts)."""

    def __init__(self, sess, spec, batch=1, dtype=np.float32, memory=None):
        self.sess, self.spec, self.dtype = sess, spec, dtype
        self.memory = memory  # cross-attention memory, for a decoder that has cross-attention inputs
        self.last_media = None
        self.inputs = {i.name for i in sess.get_inputs()}
        z = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype)
        self.past = {f"past_key_values.{i}.{k}": z for i in range(spec.num_layers) for k in ("key", "value")}
        self.mask = np.zeros((batch, 0), np.int64)

    def __call__(self, emb, position_ids, token_type, mask=None, media=None):
        b, s = position_ids.shape
        self.mask = np.concatenate([self.mask, np.ones((b, s), np.int64) if mask is None else mask], axis=1)
        feeds = dict(inputs_embeds=emb, attention_mask=self.mask, position_ids=position_ids, **self.past)
        if "token_type" in self.inputs:
            feeds["token_type"] = token_type
        if "cross_attention_memory" in self.inputs:  # steps after the prompt attend to its last image
            media = np.repeat(self.last_media, s, axis=1) if media is None else media
            self.last_media = media[:, -1:]
            feeds.update(cross_attention_memory=self.memory.astype(self.dtype), media=media)
        names = [o.name for o in self.sess.get_outputs()]
        out = dict(zip(names, self.sess.run(None, feeds)))
        self.past = {k: out[k.replace("past_key_values", "present")] for k in self.past}
        return out["logits"]


def reference(model, layout, emb, steps, memory=None):
    """Reference logits: the prompt's last position, then each decode step's."""
    cache = model.new_cache(1, 64)
    tt = torch.as_tensor(layout.token_type)[None]
    cross = cross_of(model, memory, layout.media[None])
    with torch.no_grad():
        out = [model.decode(torch.from_numpy(emb), tt, torch.as_tensor(layout.position_ids)[None], cache=cache,
                            last_only=True, cross=cross)[0, -1].numpy()]
        cross = None if cross is None else cross.with_media(cross.media[:, -1:])
        for i, tok in enumerate(steps):
            e = model.embed(torch.tensor([[tok]]))
            out.append(model.decode(e, torch.zeros(1, 1, dtype=torch.long),
                                    torch.tensor([[layout.next_position + i]]), cache=cache,
                                    start=len(layout) + i, cross=cross)[0, -1].numpy())
    return out


def run_graph(model, path, layout, emb, steps, decode_path=None, dtype=np.float32, memory=None):
    spec = spec_of(model)
    prefill = GraphRunner(session(path), spec, dtype=dtype, memory=memory)
    out = [prefill(emb.astype(dtype), layout.position_ids[None], layout.token_type[None],
                   media=layout.media[None])[0, -1]]
    runner = prefill
    if decode_path is not None:  # continue the same cache with the routing-free graph
        runner = GraphRunner(session(decode_path), spec, dtype=dtype, memory=memory)
        runner.past, runner.mask, runner.last_media = prefill.past, prefill.mask, prefill.last_media
    for i, tok in enumerate(steps):
        with torch.no_grad():
            e = model.embed(torch.tensor([[tok]])).numpy().astype(dtype)
        out.append(runner(e, np.array([[layout.next_position + i]]), np.zeros((1, 1), np.int64))[0, -1])
    return out


STEPS = (12, 40, 41, 200)


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("arch, routing, positions", ARCH_SEMANTICS)
def test_fp32_parity_prompt_with_two_images_then_decode(tiny_model, tmp_path, arch, routing, positions):
    model = tiny_model(arch, seed=3, jitter=True, expert_routing=routing, position_ids=positions)
    g = export(model, tmp_path / "td.onnx", decode_model=True)
    lay = two_image_layout(model)
    emb, mem = prompt_embeds(model, lay), image_memory(model)
    expected = reference(model, lay, emb, STEPS, mem)
    for decode_path in (None, g.decode_path):
        got = run_graph(model, g.path, lay, emb, STEPS, decode_path=decode_path, memory=mem)
        for i, (a, b) in enumerate(zip(got, expected)):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"step {i} (decode graph: {decode_path})")
    assert (g.decode_path is not None) == model.has_experts


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_variant(tiny_model, tmp_path, arch):
    model = tiny_model(arch, seed=4, jitter=True)
    g16 = export(model, tmp_path / "td16.onnx", precision="fp16")
    lay = two_image_layout(model)
    emb, mem = prompt_embeds(model, lay), image_memory(model)
    expected = reference(model, lay, emb, STEPS, mem)
    got = run_graph(model, g16.path, lay, emb, STEPS, dtype=np.float16, memory=mem)
    scale = max(np.abs(e).max() for e in expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=FP16_RTOL * scale, rtol=0, err_msg=f"step {i}")
    # weights and KV really are float16 (the graph is not an fp32 graph with fp16 IO)
    proto = onnx.load(str(g16.path), load_external_data=False)
    big = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert {i.dtype for i in g16.inputs if i.name.startswith(("past_", "inputs_"))} == {"float16"}
    assert g16.data_bytes < 0.6 * export(model, tmp_path / "td32.onnx").data_bytes


# ------------------------------------------------------------------ routing
def _producer(graph):
    return {o: n for n in graph.node for o in n.output}


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
def test_graph_routes_each_expert_by_gather_of_its_rows(tiny_model, tmp_path, arch):
    model = tiny_model(arch, seed=5, jitter=True)
    g = export(model, tmp_path / "td.onnx")
    graph = onnx.load(str(g.path), load_external_data=False).graph
    prod = _producer(graph)
    ops = {n.op_type for n in graph.node}
    assert {"NonZero", "Gather", "ScatterND", "GroupQueryAttention", "RotaryEmbedding"} <= ops

    def rows_source(tensor: str) -> onnx.NodeProto:
        node = prod[tensor]  # walk up through the MLP's elementwise ops to the row Gather
        while node.op_type != "Gather":
            node = prod[node.input[0]]
        return node

    def nonzero_of(node) -> tuple[str, str]:
        """(mask op, compared constant or 'not') behind a row-index tensor."""
        nz = prod[prod[node.input[1]].input[0]]
        assert nz.op_type == "NonZero"
        mask = prod[nz.input[0]]
        if mask.op_type == "Not":
            return "not-vision", prod[mask.input[0]].input[0]
        return "vision", mask.input[0]

    init = {t.name for t in graph.initializer}
    projections = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in init
                   and n.input[1] != "lm_head.weight"]
    first = [n for n in projections if not n.input[1].endswith("down.weight")]  # down is fed by the MLP's Mul
    vision = [n for n in first if ".vision." in n.input[1]]
    # qkv, o and the MLP input projection(s) of both experts in every layer
    assert len(vision) == len(first) // 2 >= 3 * model.config.num_hidden_layers
    last = model.config.num_hidden_layers - 1
    kept = set()  # the last layer's attention output and MLP: only the kept rows go on after attention
    for n in first:
        which, src = nonzero_of(rows_source(n.input[0]))
        if prod[src].op_type == "Gather":  # the kept rows' token types
            assert n.name.startswith(f"layers.{last}.") and ".qkv" not in n.name and prod[src].input[1] == "kept_rows/out"
            kept.add(rows_source(n.input[0]).output[0])
            src = prod[src].input[0]
        assert prod[src].op_type == "Reshape" and prod[src].input[0] == "token_type"
        assert which == ("vision" if ".vision." in n.input[1] else "not-vision"), n.name
    assert len(kept) == 4  # o and the MLP input of both experts

    # at run time the visual-expert Gemms receive exactly the token_type == 1 rows
    proto = onnx.load(str(g.path), load_external_data=False)
    watch = sorted({rows_source(n.input[0]).output[0] for n in first})
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(w) for w in watch)
    probe = tmp_path / "probe.onnx"  # next to td.onnx.data, which it refers to
    onnx.save(proto, str(probe))
    lay = two_image_layout(model)
    runner = GraphRunner(session(probe), spec_of(model))
    feeds_names = [o.name for o in runner.sess.get_outputs()]
    feeds = dict(inputs_embeds=prompt_embeds(model, lay), position_ids=lay.position_ids[None],
                 token_type=lay.token_type[None], attention_mask=np.ones((1, len(lay)), np.int64), **runner.past)
    n_vision = int((lay.token_type == 1).sum())
    assert 0 < n_vision < len(lay) and lay.token_type[-1] != 1
    logits = {}
    for all_rows in (1, 0):  # 1: what calibration runs; 0 (the default): the last layer keeps the last row
        out = runner.sess.run(None, {**feeds, DECODER_ALL_ROWS: np.array(all_rows, np.int64)})
        shapes = dict(zip(feeds_names, (o.shape for o in out)))
        logits[all_rows] = out[feeds_names.index("logits")]
        for w in watch:
            rows = (n_vision if ".vision." in w else len(lay) - n_vision) if all_rows or w not in kept else \
                (0 if ".vision." in w else 1)
            assert shapes[w][0] == rows, (w, all_rows)
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def _perturb(model, side: int, seed=9):
    """A copy of the model whose language (side 0) or visual (side 1) expert weights are re-drawn."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in m.iter_visual_expert_pairs():
            for p in pair[side].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return m


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
def test_each_expert_only_affects_its_own_positions(tiny_model, tmp_path, arch):
    model = tiny_model(arch, seed=6, jitter=True)
    lay = two_image_layout(model)
    emb = prompt_embeds(model, lay)
    all_language, all_vision = np.zeros_like(lay.token_type), np.ones_like(lay.token_type)

    def logits(m, name, token_type):
        g = export(m, tmp_path / f"{name}.onnx")
        return GraphRunner(session(g.path), spec_of(m))(emb, lay.position_ids[None], token_type[None])

    base = {k: logits(model, "base", t) for k, t in (("lang", all_language), ("vis", all_vision),
                                                       ("mixed", lay.token_type))}
    vis_changed, lang_changed = _perturb(model, 1), _perturb(model, 0)
    np.testing.assert_array_equal(logits(vis_changed, "v", all_language), base["lang"])
    np.testing.assert_array_equal(logits(lang_changed, "l", all_vision), base["vis"])
    # sensitivity: each expert does matter where it has positions
    assert np.abs(logits(vis_changed, "v2", lay.token_type) - base["mixed"]).max() > 1e-3
    assert np.abs(logits(lang_changed, "l2", lay.token_type) - base["mixed"]).max() > 1e-3


# ------------------------------------------------------------- IO and shapes
@pytest.mark.parametrize("arch", ARCHS)
def test_io_names_dtypes_and_dynamic_axes(tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    g = export(model, tmp_path / "td.onnx", max_length=100)
    c = model.config
    L = c.num_hidden_layers
    expected_in = ["inputs_embeds", "attention_mask", "position_ids"] + (["token_type"] if model.has_experts else [])
    x = spec_of(model).cross_attention
    expected_in += ["cross_attention_memory", "media"] if x is not None else []
    expected_in += [f"past_key_values.{i}.{k}" for i in range(L) for k in ("key", "value")]
    expected_out = ["logits"] + [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    sess = session(g.path)
    assert [i.name for i in sess.get_inputs()] == [i.name for i in g.inputs] == expected_in
    assert [o.name for o in sess.get_outputs()] == [o.name for o in g.outputs] == expected_out
    specs = {s.name: s for s in g.inputs + g.outputs}
    assert specs["inputs_embeds"].shape == ("batch", "sequence", c.hidden_size)
    assert specs["position_ids"] == IOSpec("position_ids", "int64", ("batch", "sequence"))
    assert specs["attention_mask"].shape == ("batch", "total_sequence")
    assert specs["past_key_values.0.key"].shape == ("batch", c.num_key_value_heads, "past_sequence", c.head_dim)
    assert specs["present.1.value"].shape == ("batch", c.num_key_value_heads, "total_sequence", c.head_dim)
    assert specs["logits"] == IOSpec("logits", "float32", ("batch", 1, c.vocab_size))
    if x is not None:
        assert specs["cross_attention_memory"].shape == (1, "memory", x.memory_width)
        assert specs["media"] == IOSpec("media", "int64", ("batch", "sequence"))
    for i in sess.get_inputs():  # the ONNX file declares the same axes
        assert tuple(i.shape) == specs[i.name].shape
    assert g.max_length == 100 and g.files == (g.path, g.data_path)
    assert g.data_path.name == "td.onnx.data" and g.data_path.stat().st_size >= g.data_bytes > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_two_prompts_of_different_lengths(tiny_model, tmp_path, arch):
    """Right-padded batch of 2 (mask 0 on the padding) equals each prompt run alone, prefill and decode."""
    model = tiny_model(arch, seed=7, jitter=True)
    g = export(model, tmp_path / "td.onnx")
    spec = spec_of(model)
    lays = [two_image_layout(model), two_image_layout(model, tail=(9, 10, 11, 12, 13, 14, 15))]
    embs = [prompt_embeds(model, lay, seed=i) for i, lay in enumerate(lays)]
    mem = image_memory(model)  # shared by both rows; media says which image each position reads
    singles = []
    for lay, emb in zip(lays, embs):
        r = GraphRunner(session(g.path), spec, memory=mem)
        singles.append([r(emb, lay.position_ids[None], lay.token_type[None], media=lay.media[None])[0, 0]])
        singles[-1].append(r(embs[0][:, :1], np.array([[lay.next_position]]), np.zeros((1, 1), np.int64))[0, 0])
    S = max(len(lay) for lay in lays)
    pad = lambda a, fill=0: np.concatenate([a, np.full((S - len(a),) + a.shape[1:], fill, a.dtype)])
    r = GraphRunner(session(g.path), spec, batch=2, memory=mem)
    mask = np.stack([pad(np.ones(len(lay), np.int64)) for lay in lays])
    out = r(np.stack([pad(e[0]) for e in embs]), np.stack([pad(lay.position_ids) for lay in lays]),
            np.stack([pad(lay.token_type) for lay in lays]), mask=mask,
            media=np.stack([pad(lay.media, lay.media[-1]) for lay in lays]))
    assert out.shape == (2, 1, spec.vocab_size)
    for b in range(2):
        np.testing.assert_allclose(out[b, 0], singles[b][0], atol=ATOL, rtol=0)
    # one decode step for both rows: GQA writes each row's token at its own slot (seqlens_k)
    # row 0's padding stays masked (mask sum = its length), so its new token goes to slot len(lays[0])
    step = r(np.concatenate([embs[0][:, :1]] * 2), np.array([[lay.next_position] for lay in lays]),
             np.zeros((2, 1), np.int64), mask=np.ones((2, 1), np.int64))
    for b in range(2):
        np.testing.assert_allclose(step[b, 0], singles[b][1], atol=ATOL, rtol=0)


def test_kv_buffer_is_updated_in_place(tiny_model, tmp_path):
    """Past and present bound to one preallocated OrtValue: GQA writes the new slot into it, nothing moves."""
    model = tiny_model("cogvlm", seed=8, jitter=True)
    g = export(model, tmp_path / "td.onnx")
    spec = spec_of(model)
    sess = session(g.path)
    lay = two_image_layout(model)
    max_len = 64
    bufs = {f"{i}.{k}": ort.OrtValue.ortvalue_from_numpy(
        np.full((1, spec.num_kv_heads, max_len, spec.head_dim), 7.0, np.float32))
        for i in range(spec.num_layers) for k in ("key", "value")}
    ptrs = {k: v.data_ptr() for k, v in bufs.items()}
    io = sess.io_binding()
    io.bind_output("logits")
    for k, v in bufs.items():
        io.bind_ortvalue_input(f"past_key_values.{k}", v)
        io.bind_ortvalue_output(f"present.{k}", v)

    def step(emb, pos, tt, total):
        for name, a in (("inputs_embeds", emb), ("position_ids", pos), ("token_type", tt),
                        ("attention_mask", np.ones((1, total), np.int64))):
            io.bind_cpu_input(name, a)
        sess.run_with_iobinding(io)
        return io.get_outputs()

    emb = prompt_embeds(model, lay)
    outs = step(emb, lay.position_ids[None], lay.token_type[None], len(lay))
    expected = reference(model, lay, emb, STEPS)
    np.testing.assert_allclose(outs[0].numpy()[0, 0], expected[0], atol=ATOL, rtol=0)
    before = bufs["0.key"].numpy().copy()
    assert (before[:, :, len(lay):] == 7.0).all() and not (before[:, :, :len(lay)] == 7.0).any()
    for i, tok in enumerate(STEPS):
        with torch.no_grad():
            e = model.embed(torch.tensor([[tok]])).numpy()
        outs = step(e, np.array([[lay.next_position + i]]), np.zeros((1, 1), np.int64), len(lay) + i + 1)
        np.testing.assert_allclose(outs[0].numpy()[0, 0], expected[i + 1], atol=ATOL, rtol=0)
        for j, o in enumerate(outs[1:]):  # the presents are the bound buffers themselves
            assert o.data_ptr() == list(ptrs.values())[j] and o.shape() == [1, spec.num_kv_heads, max_len,
                                                                             spec.head_dim]
    after = bufs["0.key"].numpy()
    n = len(lay) + len(STEPS)
    np.testing.assert_array_equal(after[:, :, :len(lay)], before[:, :, :len(lay)])  # old slots untouched
    assert not (after[:, :, len(lay):n] == 7.0).any() and (after[:, :, n:] == 7.0).all()
    assert {k: v.data_ptr() for k, v in bufs.items()} == ptrs


# ------------------------------------------------------ checkpoint streaming
class TrackingTensors:
    """A tensor source that records the most bytes of its tensors alive at once."""

    def __init__(self, source):
        self.source, self.live, self.peak, self.largest, self.gets = source, 0, 0, 0, 0

    def _free(self, n):
        self.live -= n

    def get(self, name):
        a = np.array(self.source.get(name).float().numpy())  # a private copy, tracked until it dies
        self.gets += 1
        self.live += a.nbytes
        self.peak, self.largest = max(self.peak, self.live), max(self.largest, a.nbytes)
        weakref.finalize(a, self._free, a.nbytes)
        return a

    def keys(self):
        return self.source.keys()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_from_checkpoint_dir_equals_in_memory_and_streams(tiny_model, tiny_model_dir, tmp_path, arch):
    model = tiny_model(arch, seed=10, jitter=True)
    ckpt = SafetensorsCheckpoint(tiny_model_dir(arch, model=model))
    spec = spec_of(model)
    tracked = TrackingTensors(ckpt)
    a = export_text_decoder(tracked, spec, tmp_path / "a" / "td.onnx", decode_model=True)
    b = export(model, tmp_path / "b" / "td.onnx", decode_model=True)
    for fa, fb in zip(a.files, b.files):
        assert fa.read_bytes() == fb.read_bytes(), fa.name
    # streaming: never more than one checkpoint tensor alive at a time, or one q/k/v group when the
    # spec names q, k and v separately (they are fused into one [in, q+k+v] weight)
    groups = [sum(int(np.prod(ckpt.shape(n.format(i=0)))) * 4 for n in e.qkv)
              for e in (spec.language, spec.vision) if e is not None and not isinstance(e.qkv, str)]
    assert tracked.gets >= 6 * spec.num_layers + 2
    assert tracked.peak == max([tracked.largest] + groups), (tracked.peak, tracked.largest, groups)
    assert tracked.live == 0
    # the token embedding table
    e = export_token_embedding(ckpt, spec, tmp_path / "emb.safetensors", precision="fp16")
    from safetensors.numpy import load_file

    table = load_file(str(e))["weight"]
    assert table.dtype == np.float16 and table.shape == (spec.vocab_size, spec.hidden_size)
    np.testing.assert_array_equal(table, model.token_embedding().weight.detach().numpy().astype(np.float16))


def test_errors_name_the_tensor_and_leave_no_files(tiny_model, tmp_path):
    model = tiny_model("cogvlm")
    spec = spec_of(model)
    with pytest.raises(ValueError, match="precision must be one of"):
        export(model, tmp_path / "x.onnx", precision="int3")
    name = spec.language.o.format(i=1)
    state = model.state_dict()
    bad = StateDictTensors({**state, name: state[name][:, :-8]})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        export_text_decoder(bad, spec, tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())
