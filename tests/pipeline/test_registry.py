"""Every architecture in the registry, through every format its part specs claim.

Generated from the registry: a new architecture file (``vlmexport/models/<name>.py``) is
built, validated and run here without editing this module, and a format it cannot be
exported to must be refused up front with one line. Tiny seeded models, real
onnxruntime and llama.cpp.
"""

from __future__ import annotations

import pytest

from vlmexport.core.errors import ConfigError
from vlmexport.models import architectures, get_architecture
from vlmexport.models.connectors import get_connector

ARCHS = sorted(architectures())


def gguf_projector(arch: str):
    """The llama.cpp projector the tiny config of ``arch`` claims, or None (with the refusal)."""
    A = get_architecture(arch)
    specs = A.part_specs(A.tiny_config())
    try:
        return get_connector(specs.connector.kind).check_gguf(specs)
    except ConfigError:
        return None


def test_every_architecture_counts_its_image_tokens_from_the_part_spec(tiny_model):
    for arch in ARCHS:
        model = tiny_model(arch)
        specs = type(model).part_specs(model.config)
        with_image = model.image_embeddings(
            __import__("torch").zeros(1, 3, specs.vision.image_size, specs.vision.image_size))
        assert tuple(with_image.shape[1:]) == specs.image_embeddings_shape, arch
        assert specs.image_tokens == model.image_tokens(), arch
        if specs.decoder.cross_attention is None:  # spliced: one position per embedding
            assert with_image.shape[1] == specs.image_tokens, arch


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_build_validates_and_runs_like_torch(arch, tiny_model_dir, tmp_path):
    import vlmexport
    from vlmexport.data import SyntheticVQA
    from vlmexport.pipeline.build import build

    d = tiny_model_dir(arch, seed=7, jitter=True)
    # fp32: greedy answers must be identical (fp16 on random tiny weights flips near-ties)
    res = build(d, tmp_path / "bundle", formats=("onnx",), precisions=("fp32",), e2e_prompts=8)
    rows = res.validation["parts"]
    assert rows and all(r["passed"] for r in rows)
    assert {r["part"] for r in rows} >= {"vision_encoder", "connector", "text_decoder"}
    torch_pipe = vlmexport.load(tmp_path / "bundle", backend="torch")
    ort_pipe = vlmexport.load(tmp_path / "bundle", backend="onnxruntime", precision="fp32")
    size = torch_pipe.preprocess_config.image_size
    items = SyntheticVQA(image_size=size, seed=1).eval_items("test", 2)[:6]
    for it in items:
        assert ort_pipe.generate(it.question, [it.image], max_new_tokens=6) == \
            torch_pipe.generate(it.question, [it.image], max_new_tokens=6)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_is_built_where_llama_cpp_has_the_projector_and_refused_where_not(arch, tiny_model_dir, tmp_path):
    import vlmexport
    from vlmexport.pipeline.build import build

    d = tiny_model_dir(arch, seed=8, jitter=True)
    proj = gguf_projector(arch)
    if proj is None:
        with pytest.raises(ConfigError, match="GGUF|llama.cpp"):
            build(d, tmp_path / "bundle", formats=("gguf",), precisions=("f32",), validate=False)
        assert not (tmp_path / "bundle").exists()
        return
    from vlmexport.bundle import Bundle
    from vlmexport.exporter.gguf_writer import gguf_deviations
    from vlmexport.pipeline.deviations import DeviationRefused

    A = get_architecture(arch)
    config = A.tiny_config()
    deviations = gguf_deviations(A.part_specs(config), config)
    if deviations:  # decided up front: refused unless asked for, then measured and recorded
        with pytest.raises(DeviationRefused, match="--allow-deviations"):
            build(d, tmp_path / "bundle", formats=("gguf",), precisions=("f32",))
        assert not (tmp_path / "bundle").exists()
    build(d, tmp_path / "bundle", formats=("gguf",), precisions=("f32",), e2e_prompts=4,
          allow_deviations=bool(deviations))
    assert bool(Bundle.open(tmp_path / "bundle").semantics_deviations) == bool(deviations)
    pipe = vlmexport.load(tmp_path / "bundle", backend="llamacpp", precision="f32")
    size = pipe.preprocess_config.image_size
    import numpy as np

    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    assert isinstance(pipe.generate("What is this?", [image], max_new_tokens=4), str)
