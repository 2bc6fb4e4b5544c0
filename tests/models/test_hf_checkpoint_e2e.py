"""A tiny LLaVA saved by transformers (model + processor, as the installed version lays them out)
goes through ``vlmexport build`` unchanged and answers as transformers does: the same prompt ids
and pixels as its processor, first-step logits of torch and onnxruntime close to transformers',
the same greedy tokens. And a CogVLM directory as THUDM ships it (no preprocessor_config.json,
the vicuna tokenizer beside it) builds too.

``python tests/models/test_hf_checkpoint_e2e.py`` prints the measured figures.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_hf_processor_parity import (
    CORPUS,
    IMAGE_SIZE,
    PATCH,
    clip_processor,
    conversations,
    image,
)

from vlmexport.models.llava import LLAVA_CHAT_TEMPLATE

N_IMAGE = (IMAGE_SIZE // PATCH) ** 2


def llama_sp(d: Path) -> Path:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe",
                                   character_coverage=1.0, byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
                                   minloglevel=2)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d


def tiny_hf_llava_dir(root: Path, legacy: bool = False):
    """(model, processor, dir) saved by the installed transformers."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = LlamaTokenizer.from_pretrained(str(llama_sp(root / "sp")), legacy=legacy, add_bos_token=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    proc = LlavaProcessor(image_processor=clip_processor(size={"shortest_edge": IMAGE_SIZE},
                                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                          tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=image_id + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=N_IMAGE)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter random (norms and biases too)
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    + torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.05))
    d = root / "llava"
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return model, proc, d


def measure(root: Path, backends=("torch", "onnxruntime"), steps: int = 6) -> dict:
    """Build the directory into a bundle and compare every backend with transformers."""
    import vlmexport
    from vlmexport.pipeline.build import build

    model, proc, d = tiny_hf_llava_dir(root)
    build(d, root / "bundle", formats=("onnx",), precisions=("fp32",), validate=False)
    pipes = {b: vlmexport.load(root / "bundle", backend=b) for b in backends}
    out = {"files": sorted(p.name for p in d.iterdir()), "prompts": 0, "ids_equal": 0, "pixels_equal": 0,
           "max_logit_diff": {b: 0.0 for b in backends}, "greedy_equal": {b: 0 for b in backends}}
    image_id = model.config.image_token_index
    for k, (turns, messages) in enumerate(conversations()):
        imgs = [image(k * 10 + i, 45 + 7 * i, 37 + 3 * k) for i in range(sum(t.images for t in turns))]
        pool = list(imgs)
        for m in messages:
            for c in m["content"]:
                if c["type"] == "image":
                    c["image"] = pool.pop(0)
        enc = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=steps, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
            ref_logits = model(**enc).logits[0, -1].numpy()
        out["prompts"] += 1
        for b, pipe in pipes.items():
            layout, px = pipe.prepare(turns, imgs)
            ids = np.where(layout.is_image, image_id, layout.input_ids)
            same_ids = ids.tolist() == enc["input_ids"][0].tolist()
            if px is None:
                same_px = "pixel_values" not in enc
            else:
                same_px = np.array_equal(px, enc["pixel_values"].numpy())
            if b == backends[0]:
                out["ids_equal"] += same_ids
                out["pixels_equal"] += same_px
            pipe.session.reset()
            logits = pipe.session.prefill(layout, pipe.session.encode_images(px) if px is not None else None)
            logits = np.asarray(logits).reshape(-1, ref_logits.shape[-1])[-1]
            out["max_logit_diff"][b] = max(out["max_logit_diff"][b], float(np.abs(logits - ref_logits).max()))
            got = []
            for t in vlmexport.core.generation.generate_tokens(
                    pipe.session, layout, pipe.session.encode_images(px) if px is not None else None,
                    vlmexport.core.generation.GenerationConfig(max_new_tokens=steps, stop_token_ids=())):
                got.append(int(t))
            out["greedy_equal"][b] += got == ref[:len(got)] and len(got) == len(ref)
    return out


@pytest.mark.slow
def test_transformers_saved_llava_builds_and_matches(tmp_path):
    m = measure(tmp_path)
    if transformers.__version__ >= "5":  # the image processor inside processor_config.json, no tokenizer.model
        assert "preprocessor_config.json" not in m["files"] and "tokenizer.model" not in m["files"]
    n = m["prompts"]
    assert m["ids_equal"] == n and m["pixels_equal"] == n, m
    for b in m["max_logit_diff"]:
        assert m["max_logit_diff"][b] < 1e-4, m
        assert m["greedy_equal"][b] == n, m


def test_thudm_layout_cogvlm_builds(tiny_model, tmp_path, tokenizer_path):
    """THUDM's directory: config.json + safetensors only, the vicuna tokenizer copied beside it."""
    import vlmexport
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.pipeline.build import build
    from vlmexport.models.checkpoint import save_pretrained

    d = save_pretrained(tiny_model("cogvlm", seed=3), tmp_path / "thudm", None, PreprocessConfig(image_size=32))
    (d / "preprocessor_config.json").unlink()
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                                        "add_bos_token": True, "bos_token": "<s>",
                                                        "eos_token": "</s>", "unk_token": "<unk>"}))
    hf = json.loads((d / "config.json").read_text())
    hf["template_version"] = "vqa"
    (d / "config.json").write_text(json.dumps(hf))
    build(d, tmp_path / "bundle", formats=("onnx",), precisions=("fp32",), validate=False)
    pipe = vlmexport.load(tmp_path / "bundle", backend="onnxruntime")
    assert pipe.preprocess_config == PreprocessConfig(image_size=32)
    assert "Short answer:" in pipe.template.jinja and pipe.template.encode_runs_apart
    layout, _ = pipe.prepare([vlmexport.core.prompt.Turn("What colour?", 1)], [image(1)])
    assert layout.image_spans[0][0] == 1  # right after BOS, as THUDM's build_conversation_input_ids
    from vlmexport.bundle import format_inspection, inspect_bundle

    shown = format_inspection(inspect_bundle(tmp_path / "bundle"))  # `vlmexport inspect` shows the template
    assert "Chat template  file=chat_template.jinja" in shown and "Short answer:" in shown
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert "chat_template.jinja" in files and "chat_template.json" not in files
    assert not list((tmp_path / "bundle").rglob("chat_template.json"))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(Path(tmp)), indent=1))
