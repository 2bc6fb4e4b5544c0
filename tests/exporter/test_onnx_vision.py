"""ONNX vision encoder and connector, built from checkpoint tensors, against the PyTorch parts.

Generated from the registry: every architecture x precision, for 1 and 3 images
(``num_images`` is dynamic). Models are jittered so every norm weight and bias is
non-trivial: a dropped or swapped one shows.
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vlmexport.core.errors import CheckpointError
from vlmexport.exporter import onnx_common
from vlmexport.exporter.onnx_vision import (
    StateDictTensors,
    export_connector,
    export_vision_encoder,
)
from vlmexport.pipeline.parity import validate_part
from vlmexport.models import Part, architectures
from vlmexport.models.checkpoint import SafetensorsCheckpoint

ort = pytest.importorskip("onnxruntime")

ARCHS = sorted(architectures())
PRECISIONS = ("fp32", "fp16")
FP32_ATOL = 1e-4
FP16_REL = 1e-2  # max|diff| <= 1e-2 * max|reference|
NP_DTYPE = {"fp32": np.float32, "fp16": np.float16}


def pixels(n: int, size: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def assert_close(actual: np.ndarray, ref: np.ndarray, precision: str) -> float:
    assert actual.shape == ref.shape
    assert actual.dtype == NP_DTYPE[precision]
    diff = float(np.abs(actual.astype(np.float32) - ref).max())
    bound = FP32_ATOL if precision == "fp32" else FP16_REL * float(np.abs(ref).max())
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"
    return diff


def export_both(model, out: Path, precision: str, source=None):
    specs = type(model).part_specs(model.config)
    src = source or StateDictTensors(model)
    ve = export_vision_encoder(src, specs.vision, out / f"vision_encoder.{precision}.onnx", precision)
    cn = export_connector(src, specs.connector, specs.vision.output_width, model.config.hidden_size,
                          out / f"connector.{precision}.onnx", precision, num_tokens=specs.vision.output_tokens)
    return ve, cn


# ------------------------------------------------------------------------- parity
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_parts_match_pytorch(arch, precision, tiny_model, tmp_path):
    model = tiny_model(arch, jitter=True)
    parts = model.parts()
    ve, cn = export_both(model, tmp_path, precision)
    for n in (1, 3):
        x = pixels(n)
        with torch.no_grad():
            feats = parts[Part.VISION_ENCODER](x)
            embeds = parts[Part.CONNECTOR](feats)
        assert_close(run(ve.path, {"pixel_values": x.numpy().astype(NP_DTYPE[precision])}), feats.numpy(),
                     precision)
        # the connector alone, fed the reference features
        assert_close(run(cn.path, {"image_features": feats.numpy().astype(NP_DTYPE[precision])}),
                     embeds.numpy(), precision)
    assert tuple(embeds.shape[1:]) == type(model).part_specs(model.config).image_embeddings_shape


@pytest.mark.parametrize("precision", PRECISIONS)
def test_feature_layers_keep_cls_and_dynamic_tokens(precision, tiny_model, tmp_path):
    """Several hidden states (the embeddings output included) concatenated, CLS kept, and a
    connector whose token axis is left dynamic."""
    arch = "llava"
    model = tiny_model(arch, jitter=True, vision_feature_layer=[0, -1], vision_feature_select_strategy="full")
    spec = type(model).part_specs(model.config)
    assert spec.vision.feature_layers == (0, 2) and spec.vision.keep_cls
    ve = export_vision_encoder(StateDictTensors(model), spec.vision, tmp_path / "ve.onnx", precision)
    cn = export_connector(StateDictTensors(model), spec.connector, spec.vision.output_width,
                          model.config.hidden_size, tmp_path / "cn.onnx", precision)
    assert cn.dynamic_axes["image_features"] == {0: "num_images", 1: "vision_tokens"}
    x = pixels(2)
    with torch.no_grad():
        feats = model.parts()[Part.VISION_ENCODER](x)
        embeds = model.parts()[Part.CONNECTOR](feats)
    assert feats.shape == (2, 17, 96)
    assert_close(run(ve.path, {"pixel_values": x.numpy().astype(NP_DTYPE[precision])}), feats.numpy(), precision)
    assert_close(run(cn.path, {"image_features": feats.numpy().astype(NP_DTYPE[precision])}), embeds.numpy(),
                 precision)


@pytest.mark.parametrize("arch", ARCHS)
def test_validate_part_accepts_the_export(arch, tiny_model, tmp_path):
    model = tiny_model(arch, jitter=True)
    ve, cn = export_both(model, tmp_path, "fp32")
    encoder, connector = model.parts()[Part.VISION_ENCODER], model.parts()[Part.CONNECTOR]

    def ref_encoder(inputs):
        with torch.no_grad():
            return {"image_features": encoder(torch.from_numpy(inputs["pixel_values"]).float()).numpy()}

    def ref_connector(inputs):
        with torch.no_grad():
            return {"image_embeds": connector(torch.from_numpy(inputs["image_features"]).float()).numpy()}

    feats = ref_encoder({"pixel_values": pixels(2).numpy()})["image_features"]
    for exported, ref, feeds in ((ve, ref_encoder, {"pixel_values": pixels(2).numpy()}),
                                 (cn, ref_connector, {"image_features": feats})):
        results = validate_part(exported.path, ref, feeds, [o.name for o in exported.outputs],
                                exported.dynamic_axes, "fp32", exported.path.stem, threads=1)
        assert [r.check for r in results] == ["output_names", "dynamic_axes", "shapes", "values"]
        assert all(r.passed for r in results)
        assert results[-1].max_abs_diff <= FP32_ATOL


# ------------------------------------------------------------------- IO and files
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_io_records_and_external_data(arch, precision, tiny_model, tmp_path):
    model = tiny_model(arch, jitter=True)
    ve, cn = export_both(model, tmp_path, precision)
    vc, dt = model.config.vision_config, np.dtype(NP_DTYPE[precision]).name
    spec = type(model).part_specs(model.config).vision
    # a ViT's tokens: its patches (+ CLS where kept); the spec's count covers every encoder type
    assert spec.output_tokens >= vc.num_patches
    assert [(io.name, io.dtype, io.shape) for io in ve.inputs] == [("pixel_values", dt, ("num_images", 3, 32, 32))]
    assert [(io.name, io.dtype, io.shape) for io in ve.outputs] == [
        ("image_features", dt, ("num_images", spec.output_tokens, spec.output_width))]
    assert [(io.name, io.dtype, io.shape) for io in cn.outputs] == [
        ("image_embeds", dt, ("num_images", *type(model).part_specs(model.config).image_embeddings_shape))]
    assert ve.dynamic_axes == {"pixel_values": {0: "num_images"}, "image_features": {0: "num_images"}}
    for exported in (ve, cn):
        assert exported.data_path == exported.path.with_name(exported.path.name + ".data")
        assert exported.data_path.is_file() and exported.files == (exported.path, exported.data_path)
        proto = onnx.load(str(exported.path), load_external_data=False)
        assert proto.opset_import[0].version == 17 and proto.ir_version == 8
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        # every checkpoint tensor went to the data file; what is inline are shapes and scalars
        assert external and all(int(np.prod(t.dims)) <= 4 for t in inline)
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {exported.data_path.name}
        lengths = sum(int(e.value) for t in external for e in t.external_data if e.key == "length")
        assert lengths == sum(int(np.prod(t.dims)) * np.dtype(NP_DTYPE[precision]).itemsize for t in external)
        assert lengths == exported.data_bytes <= exported.data_path.stat().st_size
        assert exported.path.stat().st_size < 32 * 1024  # the graph alone, no weights
        onnx.checker.check_model(str(exported.path), full_check=True)
    # nothing but the two files per part is left behind (temporary files renamed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for e in (ve, cn) for p in e.files)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_from_checkpoint_dir_equals_in_memory(arch, tiny_model, tiny_model_dir, tmp_path):
    model = tiny_model(arch, jitter=True)
    ckpt = SafetensorsCheckpoint(tiny_model_dir(arch, model=model))
    mem = export_both(model, tmp_path / "mem", "fp32")
    disk = export_both(model, tmp_path / "disk", "fp32", source=ckpt)
    for a, b in zip(mem, disk):
        assert a.data_path.read_bytes() == b.data_path.read_bytes()
        assert (a.inputs, a.outputs) == (b.inputs, b.outputs)
    x = {"pixel_values": pixels(3).numpy()}
    np.testing.assert_array_equal(run(mem[0].path, x), run(disk[0].path, x))


# ----------------------------------------------------------------------- streaming
class RecordingTensors:
    """A tensor source that tracks which handed-out tensors the exporter still holds."""

    def __init__(self, inner):
        self.inner = inner
        self.alive: list[tuple[weakref.ref, int]] = []
        self.fetched: list[str] = []
        self.max_alive_bytes = 0
        self.max_alive_count = 0

    def keys(self):
        return self.inner.keys()

    def alive_now(self) -> list[int]:
        self.alive = [(r, n) for r, n in self.alive if r() is not None]
        return [n for _, n in self.alive]

    def get(self, name):
        t = self.inner.get(name).clone()  # a fresh tensor, as a safetensors read returns
        self.fetched.append(name)
        self.alive.append((weakref.ref(t), t.numel() * t.element_size()))
        alive = self.alive_now()
        self.max_alive_bytes = max(self.max_alive_bytes, sum(alive))
        self.max_alive_count = max(self.max_alive_count, len(alive))
        return t


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_stream_one_tensor_at_a_time(arch, tiny_model, tmp_path, monkeypatch):
    # deeper and wider than tiny, so the whole is many times one tensor (8 layers: the whole is > 10x even a
    # second encoder's patch convolution, which this does not widen)
    vc = dataclasses.replace(tiny_model(arch).config.vision_config, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=8)
    model = tiny_model(arch, jitter=True, vision_config=vc)
    monkeypatch.setattr(onnx_common, "CHUNK_BYTES", 4096)  # many chunks per weight
    source = RecordingTensors(StateDictTensors(model))
    spec = type(model).part_specs(model.config).vision
    export_vision_encoder(source, spec, tmp_path / "ve.onnx", "fp32")
    sizes = [model.state_dict()[n].numel() * 4 for n in source.fetched]
    total, largest = sum(sizes), max(sizes)
    assert len(set(source.fetched)) == len(source.fetched)  # each tensor read once
    # at most one (q, k, v) group is held at a time, never the model
    assert source.max_alive_count <= 3
    assert source.max_alive_bytes <= 3 * largest
    assert source.max_alive_bytes * 10 < total
    assert source.alive_now() == []
    # the layers past the deepest feature layer of a ViT (each ViT, for encoders side by side) are not exported
    for vit in (b for b in getattr(spec, "branches", (spec,)) if hasattr(b, "layers_used")):
        unused = [t.format(i=i) for i in range(vit.layers_used, vit.num_layers) for t in (vit.fc1, vit.o)]
        assert not set(unused) & set(source.fetched)
    # and the data file holds exactly the fetched tensors, plus the tables a writer derives from one
    # (relative positions gathered by offset: "<name>.by_offset") and alignment padding
    proto = onnx.load(str(tmp_path / "ve.onnx"), load_external_data=False)
    derived = {t.name[: -len(".by_offset")]: int(np.prod(t.dims)) * 4 for t in proto.graph.initializer
               if t.name.endswith(".by_offset")}
    written = total - sum(s for n, s in zip(source.fetched, sizes) if n in derived) + sum(derived.values())
    data = (tmp_path / "ve.onnx.data").stat().st_size
    assert written <= data < written + 64 * len(sizes)


def test_output_does_not_depend_on_chunk_size(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("llava", jitter=True)
    spec = type(model).part_specs(model.config).vision
    export_vision_encoder(StateDictTensors(model), spec, tmp_path / "a.onnx", "fp16")
    monkeypatch.setattr(onnx_common, "CHUNK_BYTES", 100)  # chunks that split rows unevenly
    export_vision_encoder(StateDictTensors(model), spec, tmp_path / "b.onnx", "fp16")
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize("arch", ARCHS)
def test_missing_or_misshapen_tensor_is_one_clear_error(arch, tiny_model, tmp_path):
    model = tiny_model(arch)
    spec = type(model).part_specs(model.config).vision
    state = model.state_dict()
    victim = getattr(spec, "branches", (spec,))[-1].fc2.format(i=0)  # the last encoder's, where there are several
    missing = {k: v for k, v in state.items() if k != victim}
    with pytest.raises(CheckpointError, match=f"lacks tensor {victim}"):
        export_vision_encoder(StateDictTensors(missing), spec, tmp_path / "ve.onnx")
    wrong = dict(state, **{victim: state[victim][:, :-1]})
    with pytest.raises(CheckpointError, match=f"tensor {victim} has shape"):
        export_vision_encoder(StateDictTensors(wrong), spec, tmp_path / "ve.onnx")
    assert list(tmp_path.iterdir()) == []  # partial files removed


# ------------------------------------------------ shared helpers (onnx_common) the decoder reuses
@pytest.mark.parametrize("precision", PRECISIONS)
def test_graph_builder_helpers_match_torch(precision, tmp_path):
    from vlmexport.models.layers import ACTIVATIONS, RMSNorm

    gen = torch.Generator().manual_seed(0)
    B, H, S, hd = 2, 3, 5, 4
    x = torch.randn(B, S, H * hd, generator=gen)
    norm = RMSNorm(H * hd, eps=1e-5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(H * hd, generator=gen) * 0.1)
    mask = torch.triu(torch.full((S, S), -1e4), diagonal=1)  # causal, additive
    acts = sorted(ACTIVATIONS)
    with onnx_common.GraphBuilder(tmp_path / "ops.onnx", "ops", precision) as g:
        xi = g.input("x", ("batch", S, H * hd))
        g.output(g.rms_norm(xi, g.weight("norm.weight", norm.weight.detach()), 1e-5), "rms", ("batch", S, H * hd))
        q = g.split_heads(xi, H, hd)
        att = g.sdpa(q, q, q, hd, mask=g.weight("mask", mask), softmax_fp32=True)
        g.output(g.merge_heads(att, H * hd), "attn", ("batch", S, H * hd))
        for a in acts:
            g.output(g.activation(xi, a), a, ("batch", S, H * hd))
        exported = g.finish()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(exported.path), opts, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in exported.outputs], sess.run(None, {"x": x.numpy().astype(NP_DTYPE[precision])})))
    qh = x.reshape(B, S, H, hd).transpose(1, 2)
    with torch.no_grad():
        want = {"rms": norm(x), "attn": torch.nn.functional.scaled_dot_product_attention(qh, qh, qh, attn_mask=mask)
                .transpose(1, 2).reshape(B, S, H * hd), **{a: ACTIVATIONS[a](x) for a in acts}}
    for name, ref in want.items():
        assert_close(got[name], ref.numpy(), precision)
