"""vlmexport/quant on tiny in-test cogvlms: calibration, recipes, INT8 QDQ, INT4/INT8 weight-only, gates, bundle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")  # onnxruntime's MatMulNBits quantizer needs it

from vlmexport.core.errors import BundleError, ConfigError, DataError, VlmexportError  # noqa: E402
from vlmexport.quant import calib as calib_mod  # noqa: E402
from vlmexport.pipeline.quantize import QuantOptions, ort_session, prompt_pipeline, quantize_onnx, gate_items  # noqa: E402
from vlmexport.quant.calib import (CalibrationSettings, activation_stats, build_calibration, decoder_feeds,  # noqa: E402
                                   input_hessians)
from vlmexport.quant.gates import Gate, QuantizationGateError, check_gates, logit_scores  # noqa: E402
from vlmexport.quant.recipe import QuantRecipe, default_recipe, for_precision  # noqa: E402

SMALL = CalibrationSettings(images=16, pairs=4)
PARTS = ("vision_encoder", "connector", "text_decoder", "token_embedding")


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, tokenizer_path, tiny_model):
    """A jittered tiny cogvlm model directory and its fp32 ONNX parts (no validation)."""
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.pipeline.build import build, load_source
    from vlmexport.models.checkpoint import save_pretrained

    root = tmp_path_factory.mktemp("quant")
    md = save_pretrained(tiny_model("cogvlm", jitter=True), root / "model", tokenizer_path,
                         PreprocessConfig(image_size=32))
    build(md, root / "bundle", formats=("onnx",), precisions=("fp32",), reference=False, validate=False)
    files = {p: root / "bundle" / f"onnx/{p}.fp32.{'safetensors' if p == 'token_embedding' else 'onnx'}"
             for p in PARTS}
    src = load_source(md)
    return {"root": root, "model_dir": md, "src": src, "files": files, "model": src.model_section()}


def _prep(b):
    s = b["src"]
    return prompt_pipeline(b["model_dir"] / "tokenizer.model", s.template, s.preprocess, b["model"])


@pytest.fixture(scope="module")
def quantized(fp32_bundle):
    s = fp32_bundle["src"]
    out = fp32_bundle["root"] / "q"
    r = quantize_onnx(fp32_bundle["files"], out, ["int8", "int4"], tokenizer_path=fp32_bundle["model_dir"] /
                      "tokenizer.model", template=s.template, preprocess=s.preprocess, model=fp32_bundle["model"],
                      options=QuantOptions(calibration=SMALL, eval_per_category=2, allow_degraded=True,
                                           cache_dir=str(fp32_bundle["root"] / "cache")))
    return r, out


# ------------------------------------------------------------------ recipes
def test_recipe_first_match_wins_and_none_keeps_full_precision(tmp_path):
    r = QuantRecipe.from_dict({"text_decoder": [["lm_head", None], ["layers.0.*", "int8"], ["*", "int4"]]})
    assert r.precision_of("text_decoder", "lm_head", "lm_head.weight") is None
    assert r.precision_of("text_decoder", "layers.0.vision.qkv", "w") == "int8"
    assert r.precision_of("text_decoder", "layers.1.vision.qkv", "w") == "int4"
    assert r.precision_of("vision_encoder", "anything") is None  # no rule: full precision
    flipped = QuantRecipe.from_dict({"text_decoder": [["*", "int4"], ["lm_head", None]]})
    assert flipped.precision_of("text_decoder", "lm_head") == "int4"  # first match, not most specific
    # weight names match too
    assert r.precision_of("text_decoder", "node_without_rule_name", "lm_head") is None
    p = tmp_path / "r.json"
    p.write_text(json.dumps(r.to_dict()))
    assert QuantRecipe.load(p) == r
    assert for_precision(r, "text_decoder", "int8").precision_of("text_decoder", "layers.1.o") == "int8"
    assert default_recipe().precision_of("text_decoder", "lm_head") == "int8"
    # a user recipe that names only the decoder keeps the default rules of the other parts
    user = QuantRecipe.from_dict({"text_decoder": [["lm_head", None], ["*", "int4"]]}).over(default_recipe())
    assert user.precision_of("text_decoder", "lm_head") is None
    assert user.precision_of("vision_encoder", "n_MatMul_20") == "int8"
    with pytest.raises(ConfigError, match="int3"):
        QuantRecipe.from_dict({"text_decoder": [["*", "int3"]]})
    with pytest.raises(ConfigError, match="unknown part"):
        QuantRecipe.from_dict({"decoder": [["*", "int4"]]})


# -------------------------------------------------------------- calibration
def test_calibration_is_deterministic_cached_and_from_val(fp32_bundle, tmp_path, monkeypatch):
    prep = _prep(fp32_bundle)
    a = build_calibration(prep, SMALL, tmp_path)
    assert a.source.startswith("synthetic:val:") and a.pixels.shape == (16, 3, 32, 32) and a.num_pairs == 4
    assert list(tmp_path.glob("calib-*.npz")) == [tmp_path / f"calib-{a.key}.npz"]
    monkeypatch.setattr(calib_mod, "_questions", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
    b = build_calibration(prep, SMALL, tmp_path)  # from the cache: no data generated
    monkeypatch.undo()
    fresh = build_calibration(prep, SMALL, tmp_path / "other")
    for x in (b, fresh):
        assert x.key == a.key
        for f in ("pixels", "input_ids", "position_ids", "token_type", "is_image", "offsets"):
            np.testing.assert_array_equal(getattr(x, f), getattr(a, f))
    other = build_calibration(prep, CalibrationSettings(images=16, pairs=4, seed=1), tmp_path)
    assert other.key != a.key and not np.array_equal(other.pixels, a.pixels)
    s = a.summary()
    assert s["image_positions"] == 4 * fp32_bundle["model"]["image_tokens"] and s["text_positions"] > 0


def test_more_pairs_than_images_gives_every_pair_its_image(fp32_bundle, tmp_path):
    """--calib-pairs above --calib-images: the vision parts see `images` pixels, each pair its own image."""
    from safetensors.numpy import load_file

    from vlmexport.quant.calib import pixel_reader

    cs = build_calibration(_prep(fp32_bundle), CalibrationSettings(images=2, pairs=5), tmp_path)
    assert cs.pixels.shape[0] == 5 and cs.vision_pixels.shape[0] == 2 and cs.summary()["images"] == 2
    assert sum(len(f["pixel_values"]) for f in pixel_reader(cs)) == 2
    again = build_calibration(_prep(fp32_bundle), CalibrationSettings(images=2, pairs=5), tmp_path)  # cached
    assert again.vision_pixels.shape[0] == 2 and again.pixels.shape[0] == 5
    ref = ort_session(fp32_bundle["files"], fp32_bundle["model"])
    emb = load_file(str(fp32_bundle["files"]["token_embedding"]))["weight"]
    feeds = list(decoder_feeds(cs, emb, ref.encode_images, ref.facts))
    assert len(feeds) == 5
    n_img = fp32_bundle["model"]["image_tokens"]
    for i, f in enumerate(feeds):  # pair i's image rows are the embeddings of pixels[i]
        rows = f["inputs_embeds"][0][cs.pair(i)["is_image"]]
        np.testing.assert_allclose(rows, ref.encode_images(cs.pixels[i:i + 1]).reshape(n_img, -1), atol=1e-6)


def test_visual_expert_statistics_come_from_image_tokens_only(fp32_bundle, tmp_path):
    prep = _prep(fp32_bundle)
    cs = build_calibration(prep, SMALL, tmp_path)
    ref = ort_session(fp32_bundle["files"], fp32_bundle["model"])
    from safetensors.numpy import load_file

    emb = load_file(str(fp32_bundle["files"]["token_embedding"]))["weight"]
    stats = activation_stats(fp32_bundle["files"]["text_decoder"], decoder_feeds(cs, emb, ref.encode_images, ref.facts))
    s = cs.summary()
    vision = {k: v for k, v in stats.items() if ".vision." in k}
    language = {k: v for k, v in stats.items() if ".language." in k}
    assert vision and language
    assert all(v["modality"] == "image" and v["rows"] == s["image_positions"] for v in vision.values())
    assert all(v["modality"] == "text" and v["rows"] == s["text_positions"] for v in language.values())
    # GPTQ's Hessians come from the same routed rows: diag(sum x x^T) = rows x per-input second moment,
    # whether gathered in one pass or in several (a budget of one matrix per pass)
    nodes = sorted(vision) + sorted(language)
    feeds = decoder_feeds(cs, emb, ref.encode_images, ref.facts)
    one = input_hessians(fp32_bundle["files"]["text_decoder"], feeds, nodes)
    many = input_hessians(fp32_bundle["files"]["text_decoder"], feeds, nodes, budget_bytes=1)
    for node in nodes:
        np.testing.assert_allclose(np.diag(one[node]), stats[node]["rows"] * stats[node]["mean_sq"], rtol=1e-4)
        np.testing.assert_array_equal(one[node], many[node])


def _write_images(d: Path, n: int, size: int = 40) -> None:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"img{i:02d}.png")


def test_calibration_from_a_directory_skips_unreadable_images_and_counts_them(fp32_bundle, tmp_path, caplog):
    d = tmp_path / "imgs"
    _write_images(d, 6)
    (d / "img00.txt").write_text("What colour is the star?")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "empty.jpg").write_bytes(b"")
    prep = _prep(fp32_bundle)
    cs = build_calibration(prep, CalibrationSettings(images=6, pairs=2, data=str(d)), tmp_path / "c")
    assert cs.pixels.shape == (6, 3, 32, 32) and cs.num_pairs == 2
    # seed 0 draws both broken files before the sixth readable one (the order is deterministic)
    assert cs.skipped == 2 and cs.summary()["skipped_unreadable_images"] == 2
    assert "2 unreadable images skipped" in caplog.text
    again = build_calibration(prep, CalibrationSettings(images=6, pairs=2, data=str(d)), tmp_path / "c")
    assert again.key == cs.key and again.skipped == 2  # the count survives the cache
    (d / "img05.png").touch()  # changed data: a new key, not the cached set
    assert build_calibration(prep, CalibrationSettings(images=6, pairs=2, data=str(d)), tmp_path / "c").key != cs.key
    with pytest.raises(DataError, match=r"only 6 readable calibration images .*\(2 unreadable skipped\), 7 needed"):
        build_calibration(prep, CalibrationSettings(images=7, pairs=2, data=str(d)), tmp_path / "c")


def test_calibration_from_jsonl_skips_missing_images(fp32_bundle, tmp_path):
    d = tmp_path / "data"
    _write_images(d / "images", 3)
    recs = [{"image": f"images/img{i:02d}.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many circles are there?"}, {"from": "gpt", "value": "2"}]}
        for i in range(3)]
    recs.append({"image": "images/gone.png", "conversations": recs[0]["conversations"]})
    (d / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = str(d / "calib.jsonl")
    cs = build_calibration(_prep(fp32_bundle), CalibrationSettings(images=3, pairs=3, data=data), tmp_path / "c")
    # drawing stops at 3 readable images: the missing one counts if it came up before them
    assert cs.pixels.shape[0] == 3 and cs.num_pairs == 3 and cs.skipped in (0, 1)
    with pytest.raises(DataError, match=r"only 3 readable .*\(1 unreadable skipped\), 4 needed"):
        build_calibration(_prep(fp32_bundle), CalibrationSettings(images=4, pairs=3, data=data), tmp_path / "c")


def test_empty_or_unusable_calibration_sources_are_clear_errors(fp32_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    prep = _prep(fp32_bundle)
    for d, skipped in ((tmp_path / "empty", 0), (bad, 1)):
        with pytest.raises(DataError, match=rf"calibration set from {d} is empty \({skipped} unreadable"):
            build_calibration(prep, CalibrationSettings(images=4, pairs=1, data=str(d)), tmp_path / "c")
    with pytest.raises(ConfigError, match="directory of images or a LLaVA-style .jsonl"):
        CalibrationSettings(data=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="at least one image"):
        CalibrationSettings(images=0)


def _poison(src: Path, dst: Path, node_index: int = 1) -> tuple[str, str]:
    """A copy of ``src`` whose ``node_index``-th weight MatMul has an inf weight; (node, weight) names."""
    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    node = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits][node_index]
    w = onnx.numpy_helper.to_array(inits[node.input[1]]).copy()
    w.flat[0] = np.inf
    inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(w, node.input[1]))
    onnx.save(m, str(dst))
    return node.name, node.input[1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # onnxruntime's calibrators on the poisoned model
@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_nonfinite_activations_in_int8_calibration_name_the_layer(fp32_bundle, tmp_path, method):
    from vlmexport.quant.calib import pixel_reader
    from vlmexport.quant.quantize import quantize_int8_static

    src = tmp_path / "vision_encoder.fp32.onnx"
    name, weight = _poison(fp32_bundle["files"]["vision_encoder"], src)
    cs = build_calibration(_prep(fp32_bundle), SMALL, tmp_path / "c")
    out = tmp_path / "q" / "vision_encoder.int8.onnx"
    with pytest.raises(DataError, match=r"NaN/inf activations during calibration at the output \S+ of node") as e:
        quantize_int8_static("vision_encoder", src, out, pixel_reader(cs), method=method)
    assert f"node '{name}' (MatMul on {weight})" in str(e.value)  # the weight names the layer
    assert "\n" not in str(e.value) and not out.exists()


def test_nonfinite_decoder_activations_name_the_layer(fp32_bundle, tmp_path):
    from safetensors.numpy import load_file

    src = tmp_path / "text_decoder.fp32.onnx"
    name, weight = _poison(fp32_bundle["files"]["text_decoder"], src, node_index=0)
    cs = build_calibration(_prep(fp32_bundle), SMALL, tmp_path / "c")
    ref = ort_session(fp32_bundle["files"], fp32_bundle["model"])
    emb = load_file(str(fp32_bundle["files"]["token_embedding"]))["weight"]
    feeds = decoder_feeds(cs, emb, ref.encode_images, ref.facts)
    with pytest.raises(DataError, match=r"NaN/inf activations during calibration at the input \S+ of node '"):
        activation_stats(src, feeds)
    from vlmexport.quant.calib import first_nonfinite

    assert f"node '{name}' (MatMul on {weight})" in first_nonfinite(src, feeds)[0]


# ------------------------------------------------------------------ quantize
def _ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def test_files_and_node_types(quantized, fp32_bundle):
    r, out = quantized
    names = sorted(str(q.path.relative_to(out)) for q in r.parts)
    assert names == ["onnx/connector.int8.onnx", "onnx/text_decoder.int4.onnx", "onnx/text_decoder.int8.onnx",
                     "onnx/vision_encoder.int8.onnx"]
    for part in ("vision_encoder", "connector"):
        m = onnx.load(str(out / f"onnx/{part}.int8.onnx"))
        ops = [n.op_type for n in m.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        # symmetric activations, stored as uint8 + 128 for the cpu target (the default options)
        assert zps and all(z.dtype == np.uint8 and (z == 128).all() for z in zps)
    fp32_matmuls = [n.name for n in _ops(fp32_bundle["files"]["text_decoder"]) if n.op_type == "MatMul"]
    for prec, bits in (("int4", 4), ("int8", 8)):
        nodes = _ops(out / f"onnx/text_decoder.{prec}.onnx")
        nbits = {n.name: n for n in nodes if n.op_type == "MatMulNBits"}
        assert not [n for n in nodes if n.op_type == "MatMul"] and len(nbits) == len(fp32_matmuls)
        bits_of = {name: next(a.i for a in n.attribute if a.name == "bits") for name, n in nbits.items()}
        assert bits_of.pop("lm_head_Q8") == 8  # the default recipe: the LM head is never 4-bit
        assert set(bits_of.values()) == {bits}  # every expert projection
        assert any(".vision." in n for n in bits_of) and any(".language." in n for n in bits_of)
    assert (out / "onnx/text_decoder.int4.onnx").stat().st_size < 0.5 * sum(
        f.stat().st_size for f in fp32_bundle["files"]["text_decoder"].parent.glob("text_decoder.fp32.onnx*"))


@pytest.mark.parametrize("part", ["vision_encoder", "connector"])
def test_int8_parts_fuse_into_integer_kernels(quantized, part, tmp_path):
    """Quantized weight MatMuls/Convs must become integer kernels in onnxruntime's CPU graph
    (QLinearMatMul / QLinearConv) as the runtime opens it: one left as DequantizeLinear +
    float MatMul is slower than fp32. The ViT's residual stream feeds both the next MatMul
    and the residual Add; the Add must read the float tensor (not a quantized copy), which
    is also what lets the fusion happen. So must the cogvlm connector's gate projection, whose
    output feeds SiLU's Sigmoid and Mul: with int8 activations onnxruntime 1.32 left it as
    DequantizeLinear + fp32 MatMul; the cpu target's uint8 activations fuse it."""
    import onnxruntime as ort

    from vlmexport.runtimes.onnxruntime_backend import QDQ_DISABLED_OPTIMIZERS

    r, out = quantized
    q = next(p for p in r.parts if p.part == part)
    src = out / f"onnx/{part}.int8.onnx"
    m = onnx.load(str(src))
    prod = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "Add":
            for i in n.input:  # no residual Add reads a DequantizeLinear fed by an input-side QuantizeLinear
                p = prod.get(i)
                if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in prod:
                    src_q = prod[p.input[0]]
                    assert src_q.op_type != "QuantizeLinear" or prod.get(src_q.input[0]) is None or prod[
                        src_q.input[0]].name in q.quantized_nodes, n.name
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(src), o, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(QDQ_DISABLED_OPTIMIZERS))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node]
    fused = ops.count("QLinearMatMul") + ops.count("QLinearConv")
    assert fused == len(q.quantized_nodes), ops


def test_unsigned_activations_keep_the_int8_arithmetic(fp32_bundle, tmp_path):
    """The cpu target's uint8 + 128 activations are the symmetric int8 codes shifted: the QDQ graph's
    own arithmetic (graph optimizations off) gives bitwise the same output either way."""
    import onnxruntime as ort

    from vlmexport.quant.calib import _Reader
    from vlmexport.quant.quantize import quantize_int8_static

    files = fp32_bundle["files"]
    rng = np.random.default_rng(0)
    enc = ort.InferenceSession(str(files["vision_encoder"]), providers=["CPUExecutionProvider"])
    feats = [enc.run(["image_features"], {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)})[0]
             for _ in range(3)]
    reader = _Reader([{"image_features": f} for f in feats])
    outs, zps = {}, {}
    for target in ("gpu", "cpu"):
        unsigned = QuantOptions.for_target(target)["int8_unsigned_activations"]
        q = quantize_int8_static("connector", files["connector"], tmp_path / f"c{target}.onnx", reader,
                                 unsigned_activations=unsigned)
        m = onnx.load(str(q.path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        zps[unsigned] = {inits[n.input[2]].dtype.name for n in m.graph.node if n.op_type == "QuantizeLinear"}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(str(q.path), so, providers=["CPUExecutionProvider"])
        outs[unsigned] = [s.run(None, {"image_features": f})[0] for f in feats]
    assert zps == {False: {"int8"}, True: {"uint8"}}  # gpu (TensorRT's form) and cpu
    for a, b in zip(outs[False], outs[True]):
        np.testing.assert_array_equal(a, b)


def test_unsigned_activations_edge_cases():
    """opset 21's output_dtype follows the zero point; a zero point another node reads is refused."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vlmexport.quant.quantize import _unsigned_activations

    def graph(extra=()):
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], output_dtype=TensorProto.INT8),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]), *extra]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT if o == "y" else TensorProto.INT8, None)
                for n in nodes[1:] for o in n.output]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])], outs,
                              [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "z")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    x = np.linspace(-4, 4, 64, dtype=np.float32)  # past both ends of the int8 range: the clamps agree too

    def run(m):  # graph optimizations off: onnxruntime's own S8->U8 rewrite leaves output_dtype behind
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(["y"],
                                                                                                      {"x": x})[0]

    m = graph()
    before = run(m)
    assert _unsigned_activations(m) == 1
    np.testing.assert_array_equal(run(m), before)
    shared = graph([helper.make_node("Identity", ["z"], ["z_copy"])])
    with pytest.raises(ValueError, match="also read by"):
        _unsigned_activations(shared)


def test_int8_vision_weights_on_7_bits_compute_exactly_on_any_x86_kernel(quantized, fp32_bundle):
    """The cpu target writes the vision parts' int8 weights on 7 bits (reduce_range): onnxruntime's fused
    QLinearMatMul then equals the QDQ graph's own arithmetic (graph optimizations off) on every x86 CPU.
    With 8-bit weights a CPU without VNNI saturates its int16 pair sums: on a 2-vCPU AVX2 EPYC this
    encoder's fused output was 0.17 of max|fp32| from the exact one (docs/quantization.md)."""
    import onnxruntime as ort

    from vlmexport.core.preprocess import to_pixels
    from vlmexport.runtimes.onnxruntime_backend import QDQ_DISABLED_OPTIMIZERS

    assert QuantOptions.for_target("cpu")["int8_reduce_range"] and not QuantOptions.for_target("gpu")["int8_reduce_range"]
    _, out = quantized
    src = out / "onnx/vision_encoder.int8.onnx"
    for part in ("vision_encoder", "connector"):  # onnxruntime's reduce_range: -64..64
        m = onnx.load(str(out / f"onnx/{part}.int8.onnx"))
        dq_weights = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        codes = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer
                 if t.name in dq_weights and t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
        assert codes and max(int(np.abs(c.astype(np.int32)).max()) for c in codes) == 64, part
    px = np.stack([to_pixels(it.image, fp32_bundle["src"].preprocess) for it in gate_items(32, 2)[:8]])

    def run(level, disabled=()):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        s = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
        return s.run(None, {"pixel_values": px})[0]

    fused = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, QDQ_DISABLED_OPTIMIZERS)
    exact = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # measured 0.0000 on the AVX2 EPYC with 7-bit weights (0.17 with 8-bit ones)
    assert np.abs(fused - exact).max() <= 0.01 * np.abs(exact).max()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_level_4_computes_exactly_on_any_x86_kernel(tmp_path, precision):
    """The decoder's MatMulNBits at accuracy level 4 (int8 compute; 8 bits is the int4 bundles' LM head)
    equal their own arithmetic: activations on int8 per block of 128, times the dequantized weights.
    Same-sign activations give the largest pair sums, where a 16-bit kernel without VNNI would saturate
    (the QDQ vision parts do, see the 7-bit test above). Measured 0.00000 of max|y| on an AVX2 EPYC."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vlmexport.quant.quantize import quantize_weight_only

    rng = np.random.default_rng(0)
    K, N = 512, 256
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    w[:, :8] = 0.02  # equal-magnitude columns: every code at the range's end, so same-sign inputs sum highest
    w[:, 8:16] = np.where(np.arange(K)[:, None] % 2, 0.02, -0.02)
    g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="proj")], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    runs = {}
    for level in (4, 1):  # level 1: fp32 compute on the dequantized weights
        q = quantize_weight_only("text_decoder", tmp_path / "f.onnx", tmp_path / f"q{level}.onnx", precision,
                                 block_size=128, accuracy_level=level)
        runs[level] = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"])
    w_deq = runs[1].run(None, {"a": np.eye(K, dtype=np.float32)})[0].astype(np.float64)
    for a in (np.abs(rng.standard_normal((16, K))), rng.standard_normal((16, K)), np.full((4, K), 3.0),
              np.where(np.arange(K) % 2, 1.0, -1.0)[None].repeat(4, 0)):
        a = a.astype(np.float32)
        blocks = a.reshape(len(a), K // 128, 128)
        scale = np.abs(blocks).max(-1, keepdims=True) / 127
        exact = (np.round(blocks / scale) * scale).reshape(len(a), K).astype(np.float64) @ w_deq
        y = runs[4].run(None, {"a": a})[0]
        assert np.abs(y - exact).max() <= 1e-4 * np.abs(exact).max()


def test_outputs_close_to_fp32(quantized, fp32_bundle):
    r, out = quantized
    ref = ort_session(fp32_bundle["files"], fp32_bundle["model"])
    files = dict(fp32_bundle["files"], vision_encoder=out / "onnx/vision_encoder.int8.onnx",
                 connector=out / "onnx/connector.int8.onnx")
    q = ort_session(files, fp32_bundle["model"])
    from vlmexport.core.preprocess import to_pixels

    px = np.stack([to_pixels(it.image, fp32_bundle["src"].preprocess) for it in gate_items(32, 2)[:8]])
    a, b = ref.encode_images(px), q.encode_images(px)
    # measured on this model: 3.3e-2 (vision encoder) and 4.0e-2 (connector) of max|fp32|
    assert np.abs(a - b).max() <= 0.1 * np.abs(a).max()
    # logits (14 test prompts, 16 calibration images; near-flat logits of a random model):
    # measured int8 cosine 0.9990, top-1 0.86
    assert r.scores["int8"]["mean_cosine"] >= 0.99 and r.scores["int8"]["top1_agreement"] >= 0.75
    assert r.scores["int4"]["mean_cosine"] >= 0.9
    assert {g["gate"] for s in r.scores.values() for g in s["gates"]} == {"max_accuracy_drop"}


def test_scores_hold_eval_exact_match_per_category_and_mme(quantized, capsys):
    """Each precision's scores carry ``vlmexport eval``'s exact match (overall and per category)
    and MME-style score beside fp32's (computed once), and `vlmexport build` prints them."""
    from vlmexport.cli import _print_gates

    r, _ = quantized
    cats = {it.category for it in gate_items(32, 2)}
    fp32 = {k: r.scores["int8"][k] for k in ("accuracy_fp32", "mme_score_fp32", "per_category_fp32")}
    for s in r.scores.values():
        assert set(s["per_category"]) == set(s["per_category_fp32"]) == cats
        assert {k: s[k] for k in fp32} == fp32
        assert s["mme_drop"] == pytest.approx(s["mme_score_fp32"] - s["mme_score"])
        assert 0 <= s["mme_score"] <= 200  # one MME category (existence): acc + acc+, x100
    _print_gates({"onnx": {"scores": r.scores}})
    text = capsys.readouterr().out
    assert "int8/int4 ONNX against fp32 (14 test prompts, fp32 " in text
    assert all(f"{r.scores[p]['mme_score']:.1f}" in text for p in ("int8", "int4"))


def test_gates_fail_on_a_broken_quantization(quantized, fp32_bundle, tmp_path):
    _, out = quantized
    m = onnx.load(str(out / "onnx/text_decoder.int4.onnx"))
    for t in m.graph.initializer:  # break it: every 4-bit block's scale set to zero
        if t.name.endswith("_scales"):
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(t)), t.name))
    broken = tmp_path / "text_decoder.int4.onnx"
    onnx.save(m, str(broken))
    prep = _prep(fp32_bundle)
    ref = prompt_pipeline(fp32_bundle["model_dir"] / "tokenizer.model", prep.template, prep.preprocess_config,
                          fp32_bundle["model"], ort_session(fp32_bundle["files"], fp32_bundle["model"]))
    bad = prompt_pipeline(fp32_bundle["model_dir"] / "tokenizer.model", prep.template, prep.preprocess_config,
                          fp32_bundle["model"], ort_session(dict(fp32_bundle["files"], text_decoder=broken),
                                                            fp32_bundle["model"]))
    scores = logit_scores(ref, bad, gate_items(32, 2)[:6])
    assert scores["mean_cosine"] < 0.9
    with pytest.raises(QuantizationGateError, match=r"^int4: gate min_cosine failed: measured 0(\.\d+)?, limit 0\.9"):
        check_gates(scores, "int4", Gate(min_cosine=0.9))
    kept = check_gates(scores, "int4", Gate(min_cosine=0.9), allow_degraded=True)
    assert kept["degraded"] and not kept["passed"] and kept["gates"][0]["measured"] == pytest.approx(
        scores["mean_cosine"], abs=1e-6)
    # the default accuracy gates: 0.5 points for int8, 1.5 for int4
    with pytest.raises(QuantizationGateError, match="max_accuracy_drop failed: measured 0.6"):
        check_gates({"top1_agreement": 1, "mean_cosine": 1, "accuracy_drop_points": 0.6}, "int8")
    assert check_gates({"top1_agreement": 1, "mean_cosine": 1, "accuracy_drop_points": 1.4}, "int4")["passed"]


# -------------------------------------------------------------------- bundle
def test_build_writes_quantized_parts_and_load_selects_per_part(fp32_bundle, tmp_path, monkeypatch):
    from vlmexport.bundle import Bundle
    from vlmexport.pipeline.build import build
    from vlmexport.runtimes.loader import load

    out = tmp_path / "bundle"
    build(fp32_bundle["model_dir"], out, formats=("onnx",), precisions=("fp32", "int8", "int4"), reference=False,
          validate=True, e2e_prompts=2,
          quant=QuantOptions(calibration=SMALL, eval_per_category=2, allow_degraded=True, cache_dir=str(tmp_path)))
    b = Bundle.open(out)
    assert b.precisions("vision_encoder", "onnx") == ["fp32", "int8"]
    assert b.precisions("text_decoder", "onnx") == ["fp32", "int8", "int4"]
    dec = b.find("text_decoder", "onnx", "int4")
    assert dec.file == "onnx/text_decoder.int4.onnx"
    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest["calibration"]["onnx"]
    assert cal["images"] == 16 and cal["pairs"] == 4 and set(cal["scores"]) == {"int8", "int4"}
    assert {r["precision"] for r in manifest["validation"]["parts"]} == {"fp32"}
    pipe = load(out, backend="onnxruntime", precision="int4", cpu_prefill="off")  # the int8 prefill: below
    s = pipe.session
    assert pipe.backend == "onnxruntime-int4"
    assert s.decoder._model_path.endswith("text_decoder.int4.onnx")
    # no int4 vision parts: int4 runs them in int8, the combination its gate scored
    assert s.vision_encoder._model_path.endswith("vision_encoder.int8.onnx")
    assert s.connector._model_path.endswith("connector.int8.onnx")
    assert {p: v["precision"] for p, v in cal["scores"]["int4"]["parts"].items()} == {
        "vision_encoder": "int8", "connector": "int8", "text_decoder": "int4"}
    assert load(out, backend="onnxruntime", precision="int8").session.connector._model_path.endswith(
        "connector.int8.onnx")
    assert isinstance(pipe.generate("what is shown?", [np.zeros((32, 32, 3), np.uint8)], max_new_tokens=3), str)

    # the quantized decoders' routing-free decode graphs: listed (so hashed), graph only over the quantized
    # weights, without routing, used for decode steps, and giving exactly the routed graph's logits
    for p in ("int8", "int4"):
        a = b.find("text_decoder", "onnx", p)
        dg = a.extra["decode_graph"]
        assert dg == f"onnx/text_decoder.{p}.decode.onnx" and dg in {d["file"] for d in a.data_files}
        m = onnx.load(str(out / dg), load_external_data=False)
        ops = [n.op_type for n in m.graph.node]
        assert "NonZero" not in ops and "token_type" not in {i.name for i in m.graph.input}
        experts = sum(a.extra["quantization"]["nodes_per_precision"].values()) - 1  # both experts, not the LM head
        assert ops.count("MatMulNBits") == experts // 2 + 1  # the language expert's and the LM head
    assert b.find("text_decoder", "onnx", "fp32").extra["decode_graph"] == "onnx/text_decoder.fp32.decode.onnx"
    assert s.decode_graph._model_path.endswith("text_decoder.int4.decode.onnx")
    assert load(out, backend="onnxruntime", precision="fp32").session.decode_graph is None  # +0.95 GB on bench-s
    from vlmexport.core.layout import ImagePiece, TextPiece, build_layout

    lay = build_layout([TextPiece((1, 5, 6)), ImagePiece(fp32_bundle["model"]["image_tokens"]), TextPiece((7, 8))],
                       fp32_bundle["model"]["expert_routing"], fp32_bundle["model"]["position_ids"])
    emb = s.encode_images(np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    steps = []
    for graph in (s.decode_graph, None):
        s.decode_graph = graph
        s.reset()
        s.prefill(lay, emb)
        steps.append([s.decode(9 + k, lay.next_position + k) for k in range(4)])
    assert all(np.array_equal(x, y) for x, y in zip(*steps))
    # "auto", load's default: the int8-GEMM prefill (runtimes/cpu_prefill.py) on a CPU without VNNI for a
    # decoder whose gate passed it, into the user cache, keyed by the manifest's hashes; else the bundle's graph
    from vlmexport.runtimes import cpu_prefill

    assert cpu_prefill.gate_record(dec)["format_version"] == cpu_prefill.FORMAT_VERSION
    for lacks in (True, False):
        monkeypatch.setattr(cpu_prefill, "lacks_int8_dot", lambda: lacks)
        auto = load(out, backend="onnxruntime", precision="int4").session
        used = lacks and cpu_prefill.gate_passed(dec)
        assert (auto.prefill_path is not None) == used
        if used:
            assert auto.prefill_path.is_relative_to(cpu_prefill.cache_root())
            assert auto.decode_graph._model_path.endswith("text_decoder.int4.decode.onnx")
    from vlmexport.plan import artifact_sets  # `plan --device host` on such a CPU counts the copy instead

    plain, copy = ({a.precision: a.files_bytes for a in artifact_sets(b, int8_prefill=f)} for f in (False, True))
    passed = cpu_prefill.gate_passed(dec)
    assert copy["int4"] - plain["int4"] == (cpu_prefill.gate_record(dec)["weight_bytes"] - dec.total_size_bytes
                                            if passed else 0)
    assert copy["fp32"] == plain["fp32"]
    # a tampered decode graph is refused like any other bundle file
    (out / "onnx/text_decoder.int4.decode.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="text_decoder.int4.decode.onnx"):
        load(out, backend="onnxruntime", precision="int4")


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq"])
def test_int4_algorithms(fp32_bundle, tmp_path, algorithm):
    from safetensors.numpy import load_file

    from vlmexport.quant.quantize import quantize_weight_only

    files, model = fp32_bundle["files"], fp32_bundle["model"]
    ref = ort_session(files, model)
    reader = None
    if algorithm == "gptq":  # data-driven: fed the calibration pairs (each expert sees its own modality's rows)
        cs = build_calibration(_prep(fp32_bundle), SMALL, tmp_path)
        emb = load_file(str(files["token_embedding"]))["weight"]
        reader = decoder_feeds(cs, emb, ref.encode_images, ref.facts)
    q = quantize_weight_only("text_decoder", files["text_decoder"], tmp_path / "d.onnx", "int4",
                             recipe=default_recipe(), algorithm=algorithm, reader=reader)
    assert not q.kept_nodes and len(q.quantized_nodes) == 21
    assert q.settings["nodes_per_precision"] == {"int4": 20, "int8": 1} and q.settings["int8_nodes"] == ["lm_head"]
    assert sum(n.op_type == "MatMulNBits" for n in _ops(q.path)) == 21
    prep = _prep(fp32_bundle)
    a = prompt_pipeline(fp32_bundle["model_dir"] / "tokenizer.model", prep.template, prep.preprocess_config, model, ref)
    b = prompt_pipeline(fp32_bundle["model_dir"] / "tokenizer.model", prep.template, prep.preprocess_config, model,
                        ort_session(dict(files, text_decoder=q.path), model))
    cos = logit_scores(a, b, gate_items(32, 2))["mean_cosine"]
    # measured on this model (14 test prompts): mean cosine rtn 0.963, hqq 0.978, gptq 0.992
    assert cos >= (0.98 if algorithm == "gptq" else 0.85)
    if algorithm == "gptq":  # each expert's MatMul outputs on its own modality's rows (measured: 0.085 -> 0.033 / 0.014)
        err = q.settings["output_error"]
        assert set(err) == {"language", "vision"} and all(e["gptq"] < 0.7 * e["rtn"] for e in err.values())


def test_quant_targets_and_block_sizes():
    cpu = {"int8_reduce_range": True, "int8_unsigned_activations": True, "cpu_prefill_gate": True}
    gpu = {"int8_reduce_range": False, "int8_unsigned_activations": False, "cpu_prefill_gate": False}
    assert QuantOptions.for_target("cpu") == {"block_size": 128, "accuracy_level": 4, **cpu}
    assert QuantOptions.for_target("gpu") == {"block_size": 128, "accuracy_level": 4, **gpu}
    assert QuantOptions.for_target("cpu", 32) == {"block_size": 32, "accuracy_level": 4, **cpu}
    with pytest.raises(ConfigError, match="int4 block size 48: choose one of"):
        QuantOptions(**QuantOptions.for_target("cpu", 48))
    with pytest.raises(ConfigError, match="quantization target 'npu'"):
        QuantOptions.for_target("npu")


def test_cli_build_with_recipe_and_allow_degraded(fp32_bundle, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmexport.cli import app

    monkeypatch.setenv("VLMEXPORT_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"text_decoder": [["lm_head", None], ["layers.0.*", None], ["*", "int4"]]}))
    out = tmp_path / "bundle"
    args = ["build", str(fp32_bundle["model_dir"]), "--out", str(out), "--format", "onnx", "--precision", "int4",
            "--no-validate", "--no-reference", "--calib-images", "8", "--calib-pairs", "2", "--gate-items", "2",
            "--quant-target", "gpu", "--recipe", str(recipe), "--allow-degraded"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    onnx_files = sorted(p.name for p in (out / "onnx").iterdir() if p.suffix == ".onnx")
    assert onnx_files == ["connector.fp32.onnx", "text_decoder.fp32.decode.onnx", "text_decoder.fp32.onnx",
                          "text_decoder.int4.decode.onnx", "text_decoder.int4.onnx",
                          "vision_encoder.fp32.onnx"]  # fp32 comes along: the source and the fallback
    # the decode graph keeps what the recipe kept fp32 (the LM head, layer 0's language expert) as MatMul
    dec = _ops(out / "onnx/text_decoder.int4.decode.onnx")
    assert {n.name for n in dec if n.op_type == "MatMul" and n.name.startswith(("lm_head", "layers."))} == {
        "lm_head", "layers.0.language.qkv", "layers.0.language.o", "layers.0.language.mlp.gate",
        "layers.0.language.mlp.up", "layers.0.language.mlp.down"}
    nodes = _ops(out / "onnx/text_decoder.int4.onnx")
    assert {n.name for n in nodes if n.op_type == "MatMul"} == {"lm_head"} | {
        n.name for n in nodes if n.name.startswith("layers.0.") and n.op_type == "MatMul"}
    assert any(n.op_type == "MatMul" and n.name.startswith("layers.0.") for n in nodes)
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and all(n.name.startswith("layers.1.") for n in nbits)
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {128}  # --quant-target gpu
    # int8 compute for the CPU kernel; the CUDA kernel does not read the attribute
    assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {4}
    from vlmexport.runtimes.loader import load

    assert load(out, backend="onnxruntime", precision="int4").session.decoder._model_path.endswith("int4.onnx")
    scores = json.loads((out / "manifest.json").read_text())["calibration"]["onnx"]["scores"]["int4"]
    assert "cpu_prefill_int8" not in scores  # a gpu target's prompt runs on CUDA: not scored
    bad = CliRunner().invoke(app, args[:-3] + ["--recipe", str(tmp_path / "missing.json")])
    assert bad.exit_code != 0 and "cannot read the recipe" in bad.output


def test_bench_compares_two_int4_block_sizes_of_one_model(fp32_bundle, tmp_path, monkeypatch):
    """Two builds of one model with --int4-block-size 32 and 64: the files carry their block sizes,
    and `vlmexport bench A B` times the shared torch and fp32 files once and both int4 decoders,
    each against the shared fp32 row."""
    from typer.testing import CliRunner

    from vlmexport.cli import app

    monkeypatch.setenv("VLMEXPORT_CACHE", str(tmp_path / "cache"))
    outs = {}
    for block in (32, 64):
        outs[block] = tmp_path / f"b{block}"
        r = CliRunner().invoke(app, ["build", str(fp32_bundle["model_dir"]), "--out", str(outs[block]), "--format",
                                     "onnx", "--precision", "fp32,int4", "--no-validate", "--calib-images", "8",
                                     "--calib-pairs", "2", "--gate-items", "2", "--allow-degraded",
                                     "--int4-block-size", str(block)] + ["--no-cpu-prefill-gate"] * (block == 64))
        assert r.exit_code == 0, r.output
        nbits = [n for n in _ops(outs[block] / "onnx/text_decoder.int4.onnx") if n.op_type == "MatMulNBits"]
        assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {block}
        scores = json.loads((outs[block] / "manifest.json").read_text())["calibration"]["onnx"]["scores"]["int4"]
        assert ("cpu_prefill_int8" in scores) == (block == 32)  # --no-cpu-prefill-gate: not scored
    report = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(outs[32]), str(outs[64]), "--backend", "torch,onnxruntime",
                                 "--precision", "fp32,int4", "--repeats", "1", "--decode-tokens", "2",
                                 "--prompt-tokens", "2", "--json", str(report), "--cpu-prefill", "off"])
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    rows = [(Path(row["bundle"]).name, row["backend"]) for row in data["rows"]]
    assert rows == [("b32", "torch-float32"), ("b32", "onnxruntime-fp32"), ("b32", "onnxruntime-int4"),
                    ("b64", "onnxruntime-int4")]
    assert "onnxruntime-int4 [b64] / onnxruntime-fp32 [b32]" in data["ratios"]
    assert "onnxruntime-int4 [b64] / torch-float32 [b32]" in data["ratios"]
    assert data["cpu_prefill"] == "off"


def test_cli_build_calibrates_on_a_user_directory_and_records_skipped_images(fp32_bundle, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmexport.cli import app

    monkeypatch.setenv("VLMEXPORT_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "imgs"
    _write_images(d, 8)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "bundle"
    args = ["build", str(fp32_bundle["model_dir"]), "--out", str(out), "--format", "onnx", "--precision", "int8",
            "--no-validate", "--no-reference", "--calib", str(d), "--calib-images", "8", "--calib-pairs", "2",
            "--gate-items", "2", "--allow-degraded"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cal = json.loads((out / "manifest.json").read_text())["calibration"]["onnx"]
    assert cal["source"] == str(d) and cal["images"] == 8 and cal["skipped_unreadable_images"] == 1
    bad = CliRunner().invoke(app, args[:10] + ["--calib", str(tmp_path / "nowhere")])
    assert bad.exit_code != 0 and "pass a directory of images or a LLaVA-style .jsonl file" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_gate_scores_the_int8_prefill_and_the_session_runs_it(quantized, fp32_bundle, tmp_path, monkeypatch,
                                                              caplog):
    """The build's gate scores the runtime's int8-GEMM prefill of each quantized decoder
    (runtimes/cpu_prefill.py) beside the decoder itself; a session with it runs the prompt through
    the copy and the decode steps through the bundle's graph; the loader uses it on "auto" only
    where the gate passed it and the CPU lacks VNNI."""
    from types import SimpleNamespace

    from vlmexport.core.names import CpuPrefill
    from vlmexport.runtimes import loader

    r, out = quantized
    for p in ("int8", "int4"):
        cpu = r.scores[p]["cpu_prefill_int8"]
        assert set(cpu) >= {"top1_agreement", "mean_cosine", "gates", "passed", "weight_bytes"}
        # its logits as near fp32's as the decoder's own: measured cosine 0.99814 against 0.99812 (int8),
        # 0.98755 against 0.98897 (int4; the tiny model's flat logits)
        assert cpu["mean_cosine"] >= r.scores[p]["mean_cosine"] - 0.005 and cpu["weight_bytes"] > 0
    files = dict(fp32_bundle["files"], text_decoder=out / "onnx/text_decoder.int4.onnx")
    plain = ort_session(files, fp32_bundle["model"])
    fast = ort_session(files, fp32_bundle["model"], cpu_prefill="int8", cpu_prefill_cache=tmp_path)
    assert fast.prefill_path.parent.parent == tmp_path
    assert fast.decoder._model_path == str(fast.prefill_path)
    assert fast.decode_graph._model_path == str(files["text_decoder"])  # decode steps: the bundle's graph
    from vlmexport.core.layout import ImagePiece, TextPiece, build_layout

    m = fp32_bundle["model"]
    lay = build_layout([TextPiece((1, 5, 6)), ImagePiece(m["image_tokens"]), TextPiece((7, 8))],
                       m["expert_routing"], m["position_ids"])
    px = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    logits = []
    for s in (plain, fast):
        s.reset()
        first = s.prefill(lay, s.encode_images(px))
        logits.append(np.stack([first, *(s.decode(9 + k, lay.next_position + k) for k in range(3))]))
    a, b = logits
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.995  # measured 0.9987 (the first logits) to 0.9995

    from vlmexport.runtimes.cpu_prefill import FORMAT_VERSION

    art = lambda passed, version=FORMAT_VERSION: SimpleNamespace(  # noqa: E731
        extra={"scores": {"cpu_prefill_int8": {"passed": passed, "format_version": version}}})
    assert loader._cpu_prefill(art(True), "auto") is CpuPrefill.AUTO
    assert loader._cpu_prefill(art(False), "auto") is CpuPrefill.OFF  # the copy failed its gate
    assert loader._cpu_prefill(art(True, FORMAT_VERSION - 1), "auto") is CpuPrefill.OFF  # scored another rewrite
    assert loader._cpu_prefill(SimpleNamespace(extra={}), "auto") is CpuPrefill.OFF  # built before it existed
    assert loader._cpu_prefill(art(False), "int8") is CpuPrefill.INT8  # asked for: used regardless
    monkeypatch.setattr("vlmexport.runtimes.onnxruntime_backend.wanted",
                        lambda mode: CpuPrefill.of(mode) is not CpuPrefill.OFF)  # a CPU without VNNI
    assert ort_session(files, fp32_bundle["model"], cpu_prefill="auto", cpu_prefill_cache=tmp_path).prefill_path
    blocker = tmp_path / "a-file"  # a cache that cannot be written (a read-only container, say)
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        s = ort_session(files, fp32_bundle["model"], cpu_prefill="auto", cpu_prefill_cache=blocker / "cache")
    assert s.prefill_path is None and s.decoder._model_path == str(files["text_decoder"])
    assert "int8 prefill graph not used" in caplog.text and "VLMEXPORT_CACHE" in caplog.text
    with pytest.raises(VlmexportError, match="cannot write the int8 prefill graph there"):  # asked for by name
        ort_session(files, fp32_bundle["model"], cpu_prefill="int8", cpu_prefill_cache=blocker / "cache")
    # not enough free memory for the copy beside the decoder: "auto" keeps the bundle's graph and says
    # why (before deriving anything); "int8", asked for by name, uses it all the same
    from vlmexport.runtimes import cpu_prefill

    need = cpu_prefill.copy_bytes(files["text_decoder"])
    held = sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(fast.prefill_path)).graph.initializer)
    assert need <= held <= need + 64 * 16  # the estimate leaves out the rewrite's scalar constants
    monkeypatch.setattr("vlmexport.runtimes.onnxruntime_backend.meminfo_bytes", lambda key: need)  # copy only
    caplog.clear()
    fresh = tmp_path / "fresh-cache"
    with caplog.at_level(logging.WARNING):
        s = ort_session(files, fp32_bundle["model"], cpu_prefill="auto", cpu_prefill_cache=fresh)
    assert s.prefill_path is None and not fresh.exists()
    assert "int8 prefill graph not used" in caplog.text and "GiB is available" in caplog.text
    assert ort_session(files, fp32_bundle["model"], cpu_prefill="int8", cpu_prefill_cache=fresh).prefill_path
