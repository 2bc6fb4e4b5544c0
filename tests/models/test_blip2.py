"""``blip2``: its chat templates (BLIP-2's and MiniGPT-4's), the Q-Former connector's token count
and ONNX axis, what stage 1 trains, and the one-line GGUF refusal. Parity with transformers is in
test_blip2_transformers.py; ONNX, runtime and GGUF coverage comes from the registry-parametrised
tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmexport.core.errors import ConfigError
from vlmexport.core.prompt import Turn, render
from vlmexport.models import get_architecture
from vlmexport.models.connectors import get_connector

Blip2 = get_architecture("blip2")


def test_blip2_template_puts_the_images_before_bos_as_the_processor_does(tokenizer):
    config = Blip2.tiny_config()
    t = Blip2.default_chat_template(config)
    r = render(t, [Turn("What colour?", 1, "red"), Turn("And the shape?")], tokenizer, 16)
    assert r.text == "<image><s>Question: What colour? Answer: red Question: And the shape? Answer:"
    # transformers' Blip2Processor: query tokens, then the tokenizer's own encoding (BOS first) of the text
    text_ids = [tokenizer.bos_id] + tokenizer.encode("Question: What colour? Answer: red Question: And the shape? "
                                                     "Answer:")
    assert [p.length for p in r.pieces[:1]] == [16] and list(r.pieces[1].ids) == text_ids


def test_minigpt4_template(tokenizer):
    t = Blip2.default_chat_template(Blip2.tiny_config(template_version="minigpt4"))
    assert t.image_token == "<ImageHere>" and t.encode_runs_apart
    system = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
              "it to you. Please answer my questions.")
    r = render(t, [Turn("What colour?", 1, "red"), Turn("And the shape?")], tokenizer, 8)
    assert r.text == (f"<s>{system}###Human: <Img><ImageHere></Img> What colour?###Assistant: red"
                      "###Human: And the shape?###Assistant:")
    # MiniGPT-4's get_context_emb: each text run around the image tokenized on its own, BOS on the first
    first, image, rest = r.pieces
    assert list(first.ids) == [tokenizer.bos_id] + tokenizer.encode(f"{system}###Human: <Img>")
    assert image.length == 8
    assert list(rest.ids) == tokenizer.encode("</Img> What colour?###Assistant: red###Human: And the shape?"
                                              "###Assistant:")
    # a user's own system message replaces MiniGPT-4's
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    from vlmexport.core.prompt import render_text

    text, _ = render_text(t, msgs, True, tokenizer.special_tokens_map())
    assert text == "<s>Be brief.###Human: Hi###Assistant:"


def test_training_answers_end_with_eos(tokenizer):
    for version in ("blip2", "minigpt4"):
        t = Blip2.default_chat_template(Blip2.tiny_config(template_version=version))
        r = render(t, [Turn("Colour?", 1, "red")], tokenizer, 4)
        assert r.text.endswith(" red</s>"), version
        (s, e), = r.answer_spans
        ids = [i for p in r.pieces for i in (p.ids if hasattr(p, "ids") else [-1] * p.length)]
        assert ids[e - 1] == tokenizer.eos_id and tokenizer.decode(ids[s:e - 1]).strip() == "red", version


def test_unknown_template_version_is_one_line():
    with pytest.raises(ConfigError,
                       match=r"^template_version 'vicuna' is unknown; blip2 knows \['blip2', 'minigpt4'\]$"):
        Blip2.tiny_config(template_version="vicuna")


def test_query_count_is_the_image_token_count_whatever_the_vit(tiny_model):
    model = tiny_model("blip2", num_query_tokens=5)
    specs = Blip2.part_specs(model.config)
    kind = get_connector(specs.connector.kind)
    assert specs.image_tokens == model.image_tokens() == 5
    assert kind.output_tokens(specs.connector, specs.vision.output_tokens) == 5
    assert kind.output_tokens(specs.connector, 3) == 5
    assert kind.output_axis(specs.connector, "vision_tokens") == 5
    with torch.no_grad():
        feats = model.vision_encoder_module()(torch.zeros(2, 3, 32, 32))
        assert feats.shape == (2, specs.vision.num_patches + 1, 48)  # CLS kept for the queries
        assert model.connector_module()(feats[:, :7]).shape == (2, 5, 64)


def test_onnx_connector_keeps_its_query_count_for_any_number_of_vit_tokens(tiny_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from vlmexport.exporter.onnx_vision import StateDictTensors, export_connector

    model = tiny_model("blip2", jitter=True)
    specs = Blip2.part_specs(model.config)
    g = export_connector(StateDictTensors(model), specs.connector, specs.vision.output_width,
                         model.config.hidden_size, tmp_path / "cn.onnx", "fp32")
    assert g.dynamic_axes["image_features"] == {0: "num_images", 1: "vision_tokens"}
    assert [o.shape for o in g.outputs] == [("num_images", 16, 64)]
    sess = ort.InferenceSession(str(g.path), providers=["CPUExecutionProvider"])
    for tokens in (5, 17):
        feats = torch.randn(2, tokens, 48, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            ref = model.connector_module()(feats).numpy()
        out = sess.run(None, {"image_features": feats.numpy()})[0]
        assert out.shape == (2, 16, 64) and float(np.abs(out - ref).max()) <= 1e-4


def test_stage_one_trains_the_qformer_queries_and_projection_only(tiny_model):
    from vlmexport.training.stages import apply_stage

    model = tiny_model("blip2")
    names = set(apply_stage(model, "align"))
    expected = {n for n, _ in model.named_parameters()
                if n == "query_tokens" or n.startswith(("qformer.", "language_projection."))}
    assert names == expected and "query_tokens" in names
    assert not any(n.startswith(("vision_model.", "language_model.")) for n in names)


def test_gguf_is_refused_in_one_line():
    specs = Blip2.part_specs(Blip2.tiny_config())
    with pytest.raises(ConfigError) as exc:
        get_connector(specs.connector.kind).check_gguf(specs)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("GGUF export: llama.cpp has no Q-Former projector") and msg.endswith(
        "; build --format onnx instead")


def test_other_text_decoders_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="LLaMA decoder only"):
        Blip2.config_from_hf({"architectures": ["Blip2ForConditionalGeneration"], "text_config": {"model_type": "opt"}})


def test_template_version_survives_a_save_and_load(tiny_model_dir, tokenizer):
    from vlmexport.models.checkpoint import load_pretrained

    loaded = load_pretrained(tiny_model_dir("blip2", template_version="minigpt4"))
    assert loaded.model.config.template_version == "minigpt4"
    assert loaded.template.image_token == "<ImageHere>" and loaded.template.encode_runs_apart
    r = render(loaded.template, [Turn("Colour?", 1)], tokenizer, loaded.model.image_tokens())
    assert r.text.endswith("###Human: <Img><ImageHere></Img> Colour?###Assistant:")


@pytest.mark.parametrize("version", ["blip2", "minigpt4"])
def test_align_stage_trains_the_connector_only_on_synthetic_vqa(tokenizer, tmp_path, version):
    """Stage 1 on the synthetic VQA data, either template: the Q-Former, its queries and the
    projection move; the ViT and the decoder do not."""
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.data import SyntheticVQA
    from vlmexport.models import seeded_init
    from vlmexport.training.batching import ModelLayoutInfo
    from vlmexport.training.datasets import SyntheticTrainData
    from vlmexport.training.trainer import TrainConfig, train

    model = seeded_init(Blip2(Blip2.tiny_config(template_version=version, max_position_embeddings=512)), 0)
    data = SyntheticTrainData(SyntheticVQA(image_size=32, seed=0), tokenizer, model.default_chat_template(model.config),
                              ModelLayoutInfo.of(model), PreprocessConfig(image_size=32), turns=(1, 2), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, data, TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, save_every=100, log_every=1,
                                   precision="fp32"), tmp_path / "run", stage="align")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    roles = {model.parameter_role(n) for n in changed}
    assert roles == {"connector"} and "query_tokens" in changed
    assert any(n.startswith("qformer.encoder.layer.1.") for n in changed)
