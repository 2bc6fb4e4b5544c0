"""``vary`` beyond the registry-generated tests: the two encoders' int8 calibration ranges
stay apart, the two training stages train what they say, the token order and the GGUF
refusal line. Tiny seeded models, real onnxruntime quantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vlmexport.core.errors import ConfigError
from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.data import SyntheticVQA
from vlmexport.models import get_architecture, seeded_init
from vlmexport.models.connectors import get_connector
from vlmexport.training.batching import ModelLayoutInfo
from vlmexport.training.datasets import SyntheticTrainData
from vlmexport.training.stages import apply_stage
from vlmexport.training.trainer import TrainConfig, train

ort = pytest.importorskip("onnxruntime")

SAM, CLIP = "vision_tower_high.", "vision_tower."


class Feeds:
    """An onnxruntime CalibrationDataReader over fixed feeds."""

    def __init__(self, feeds):
        self.feeds, self._it = list(feeds), iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def test_int8_calibration_gives_each_encoder_its_own_activation_ranges(tiny_model, tmp_path):
    """Calibration keeps one range per tensor; the two encoders' tensors are distinct (their
    weights keep their checkpoint names), so every quantized activation of the SAM tower gets
    the scale of its own values and every one of the CLIP tower its own."""
    from vlmexport.exporter.onnx_vision import StateDictTensors, export_vision_encoder
    from vlmexport.quant.quantize import quantize_int8_static

    model = tiny_model("vary", jitter=True)
    spec = type(model).part_specs(model.config).vision
    src = export_vision_encoder(StateDictTensors(model), spec, tmp_path / "ve.onnx").path
    gen = np.random.default_rng(0)
    feeds = [{"pixel_values": gen.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(3)]
    q = quantize_int8_static("vision_encoder", src, tmp_path / "ve.int8.onnx", Feeds(feeds), method="minmax")

    fp32 = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in fp32.graph.initializer}
    branch_of = {}  # activation read by a MatMul -> the encoder whose weight it multiplies
    for n in fp32.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            branch_of[n.input[0]] = "sam" if n.input[1].startswith(SAM) else "clip"
    assert set(branch_of.values()) == {"sam", "clip"}
    # the fp32 range of every such activation over the calibration feeds
    probe = onnx.load(str(src), load_external_data=False)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in branch_of)
    onnx.save(probe, str(tmp_path / "probe.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    absmax = dict.fromkeys(branch_of, 0.0)
    for f in feeds:
        for x, v in zip(branch_of, sess.run(list(branch_of), f)):
            absmax[x] = max(absmax[x], float(np.abs(v).max()))
    # the scale each activation got in the QDQ model
    qm = onnx.load(str(q.path))
    values = {i.name: onnx.numpy_helper.to_array(i) for i in qm.graph.initializer if len(i.dims) == 0}
    scale = {n.input[0]: float(values[n.input[1]]) for n in qm.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] in branch_of}
    assert set(scale) == set(branch_of), "every MatMul activation of both encoders is quantized"
    ratios = np.array([absmax[x] / scale[x] for x in branch_of])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)  # each scale = its own tensor's range / const
    first = {b: next(x for x in branch_of if branch_of[x] == b) for b in ("sam", "clip")}
    assert scale[first["sam"]] != scale[first["clip"]]


@pytest.fixture
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def test_stage_one_trains_the_sam_projector_alone_then_stage_two_the_rest(tmp_path, tok):
    A = get_architecture("vary")
    model = seeded_init(A(A.tiny_config(max_position_embeddings=512)), 0)
    data = SyntheticTrainData(SyntheticVQA(image_size=32, seed=0), tok, model.default_chat_template(),
                              ModelLayoutInfo.of(model), PreprocessConfig(image_size=32), turns=(1, 2))
    cfg = dict(steps=2, batch_size=2, lr=3e-3, warmup_steps=1, save_every=100, log_every=1, precision="fp32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, data, TrainConfig(**cfg, train_roles=("connector_new",)), tmp_path / "s1", stage="align")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("mm_projector_vary.") for n in changed)
    assert {n for n, _ in model.named_parameters() if n.startswith("mm_projector_vary.")} == changed

    names = apply_stage(model, "align", roles=["connector", "connector_new", "language", "embedding"])
    assert any(n.startswith("multi_modal_projector.") for n in names)
    assert any(n.startswith("language_model.") for n in names)
    assert not any(n.startswith((SAM, CLIP)) for n in names)  # both encoders stay frozen
    with pytest.raises(ConfigError, match=r"train_roles \['vocabulary'\] name no parameter of vary"):
        apply_stage(model, "align", roles=["vocabulary"])


def test_clip_tokens_come_first(tiny_model):
    model = tiny_model("vary", jitter=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    n_clip = type(model).part_specs(model.config).vision.branches[0].output_tokens
    with torch.no_grad():
        emb = model.image_embeddings(x)
        clip = model.multi_modal_projector(model.vision_encoder_module().clip(x))
        sam = model.mm_projector_vary(model.vision_tower_high(x))
    torch.testing.assert_close(emb[:, :n_clip], clip, atol=0, rtol=0)
    torch.testing.assert_close(emb[:, n_clip:], sam, atol=0, rtol=0)


def test_gguf_is_refused_in_one_line():
    A = get_architecture("vary")
    specs = A.part_specs(A.tiny_config())
    with pytest.raises(ConfigError) as exc:
        get_connector(specs.connector.kind).check_gguf(specs)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("GGUF export: llama.cpp has no projector for vision encoders side by side")
    assert msg.endswith("build --format onnx instead")


def test_encoders_must_read_one_image_size():
    A = get_architecture("vary")
    hf = A.config_to_hf(A.tiny_config())
    hf["sam_config"]["image_size"] = 64
    with pytest.raises(ConfigError, match="sam_config.image_size 64 must equal vision_config.image_size 32"):
        A.config_from_hf(hf)


@pytest.mark.slow
def test_tensorrt_profile_builds_audits_and_validates(tiny_model_dir, tmp_path):
    """Both encoders in the TensorRT profile's vision graph: plain ops (the audit passes for
    JetPack 6 and desktop), validated per part and greedy end to end on onnxruntime CPU."""
    from vlmexport.bundle import Bundle
    from vlmexport.pipeline.build import build

    out = tmp_path / "b"
    r = build(tiny_model_dir("vary", jitter=True), out, formats=("tensorrt",), precisions=("fp32",),
              reference=False, e2e_prompts=4)
    b = Bundle.open(out)
    ve = b.find("vision_encoder", "tensorrt", "fp32")
    for targets in ve.extra["audit"].values():
        assert set(targets) == {"jetson-orin", "desktop"} and all(t["passed"] for t in targets.values())
    cn = b.find("connector", "tensorrt", "fp32")
    assert [list(i.shape) for i in cn.inputs][0][1] == 20  # the token axis is fixed: 16 CLIP + 4 SAM
    rows = [x for x in r.validation["parts"] if x.get("format") == "tensorrt"]
    assert {x["part"] for x in rows} >= {"vision_encoder", "connector"} and all(x["passed"] for x in rows)
    e2e = {x["precision"]: x for x in r.validation["end_to_end"] if x.get("format") == "tensorrt"}
    assert e2e["fp32"]["rate"] == 1.0


def test_the_dense_patch_loss_is_refused_in_one_line():
    from vlmexport.training.objectives import objective_for
    from vlmexport.training.stages import Stage

    A = get_architecture("vary")
    model = A(A.tiny_config())
    for stage, weight in ((Stage.VISION, 0.0), (Stage.SCRATCH, 0.5)):
        with pytest.raises(ConfigError, match=r"^the dense per-patch loss .* vary's vision part is a "
                                              r"ParallelVisionSpec: train it with the align/scratch stages"):
            objective_for(stage, model, weight)
    objective_for(Stage.SCRATCH, model, 0.0)  # the next-token loss alone is fine
