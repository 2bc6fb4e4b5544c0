"""``internvl`` through llama.cpp's own ``internvl`` projector (libmtmd) and its ``llama`` /
``qwen2`` text architectures, against the PyTorch reference, for both decoder flavours.

Tiny seeded models (InternViT with layer scale, a 8x8 patch grid pixel-shuffled to 4x4,
LLaMA or Qwen2 decoder) are exported with vlmexport's GGUF writer (f32). What is checked,
as for the cogvlm pair (tests/runtimes/test_llamacpp_backend.py, whose tolerances apply):

- libmtmd's image embeddings match torch (llama.cpp's ViT appends CLS after the patches; the
  writer reorders the position rows; its pixel shuffle must put each patch where
  transformers' does: a transposed fold is shown to be far off);
- the decoder (flash attention off, f32 KV) matches torch to float32 rounding: llama's
  q/k rows permuted for interleaved RoPE, qwen2's q/k/v biases;
- greedy generation through the whole llama.cpp path equals torch's token for token.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from vlmexport.core.generation import GenerationConfig, generate_tokens
from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.core.preprocess import PreprocessConfig, preprocess
from vlmexport.core.prompt import Turn
from vlmexport.runtimes import llamacpp_backend as lb
from vlmexport.runtimes.pipeline import Pipeline

EMBED_RTOL = 5e-3
LOGIT_RTOL = 5e-3
EXACT_RTOL = 1e-5
N_CTX = 256
SEEDS = {"llama": 11, "qwen2": 11}

pytestmark = pytest.mark.llamacpp


def rel(a, ref) -> float:
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def pixels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cfg = PreprocessConfig(image_size=32)
    return np.stack([preprocess(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8), cfg) for _ in range(n)])


@pytest.fixture(scope="module", params=sorted(SEEDS))
def pair(request, tiny_model, tmp_path_factory, tokenizer_path):
    if not lb.llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install 'vlmexport[llamacpp]')")
    from vlmexport.exporter.gguf_writer import export_gguf
    from vlmexport.models.checkpoint import save_pretrained

    text = request.param
    model = tiny_model("internvl", seed=SEEDS[text], jitter=True, text_model_type=text)
    d = tmp_path_factory.mktemp(f"internvl-{text}") / "model"
    save_pretrained(model, d, tokenizer_path, PreprocessConfig(image_size=32))
    out = export_gguf(d, d / "gguf", "f32")
    assert out.gguf_arch == text
    return text, model, out


def torch_session(model):
    from vlmexport.runtimes.torch_session import TorchSession

    return TorchSession(model, max_length=N_CTX)


def test_image_embeddings_match_torch_patch_for_patch(pair):
    text, model, out = pair
    px = pixels(2, seed=2)
    ref = torch_session(model).encode_images(px)
    with lb.LlamaCppSession(out.text, out.mmproj, n_ctx=N_CTX, n_threads=1, expected_arch=text) as s:
        got = s.encode_images(px)
    assert got.shape == ref.shape == (2, model.image_tokens(), model.config.hidden_size)
    err = rel(got, ref)
    print(f"internvl/{text}: libmtmd image embeddings vs torch, relative max diff {err:.2e}")
    assert err < EMBED_RTOL
    # sensitivity: the fold transposed (grid rows and columns swapped) is far off
    m = int(round(model.image_tokens() ** 0.5))
    swapped = ref.reshape(2, m, m, -1).transpose(0, 2, 1, 3).reshape(ref.shape)
    assert rel(got, swapped) > 0.1


def test_decoder_logits_are_exact(pair):
    text, model, out = pair
    ref = torch_session(model)
    emb = ref.encode_images(pixels(2, seed=3))
    t = model.image_tokens()
    lay = build_layout([TextPiece((1, 5, 6)), ImagePiece(t), TextPiece((7, 8)), ImagePiece(t), TextPiece((9, 10))])
    expected = [ref.prefill(lay, emb)] + [ref.decode(tok, lay.next_position + i) for i, tok in enumerate((13, 14))]
    with lb.LlamaCppSession(out.text, None, n_ctx=N_CTX, n_threads=1, kv_type="f32", flash_attn=False,
                            expected_arch=text) as s:
        got = [s.prefill(lay, emb)] + [s.decode(tok, lay.next_position + i) for i, tok in enumerate((13, 14))]
    errs = [rel(g, e) for g, e in zip(got, expected)]
    print(f"internvl/{text}: llama.cpp decoder logits vs torch (exact session), relative max diff {max(errs):.2e}")
    assert max(errs) < EXACT_RTOL


def test_greedy_generation_equals_torch(pair, tokenizer, images):
    from vlmexport.runtimes.torch_backend import pipeline_from_model

    text, model, out = pair
    pre = PreprocessConfig(image_size=32)
    torch_pipe = pipeline_from_model(model, tokenizer, pre, max_length=N_CTX)
    with lb.LlamaCppSession(out.text, out.mmproj, n_ctx=N_CTX, n_threads=1, expected_arch=text) as s:
        llama_pipe = Pipeline(s, tokenizer, torch_pipe.template, pre, replace(torch_pipe.spec, max_length=s.max_length),
                              backend="llamacpp")
        cfg = GenerationConfig(max_new_tokens=8)
        for prompt, imgs in [("What is in the image?", images[:1]), ("<image> What colour is <image>?", images[:2]),
                             ("Count the shapes.", images[1:2])]:
            tokens = []
            for pipe in (torch_pipe, llama_pipe):
                layout, px = pipe.prepare([Turn(user=prompt, images=len(imgs))], imgs)
                emb = pipe.session.encode_images(px) if px is not None else None
                tokens.append(list(generate_tokens(pipe.session, layout, emb, cfg)))
            assert len(tokens[0]) == 8 and tokens[1] == tokens[0], (text, prompt, tokens)
