"""The ``llamacpp`` backend (``LlamaCppSession``) against the PyTorch reference.

Tiny seeded cogvlm models are exported with vlmexport's own GGUF writer (f32) and run
through llama-cpp-python's low-level API and libmtmd. Tolerances come from measurement
(6 seeds x 2 images, llama-cpp-python 0.3.36, CPU), relative to the largest |value| of
the reference:

- image embeddings (libmtmd): worst 1.8e-3. llama.cpp runs the patch convolution through
  an f16 im2col, evaluates GELU (and quick-GELU) through an fp16 lookup table of the tanh
  form and, with flash attention, rounds attention inputs to f16. Tolerance 5e-3.
- last-position logits, llama.cpp's default context (flash attention "auto", which is
  on for CPU, f16 KV cache): worst 1.8e-3 (2.3e-3 with libmtmd's image embeddings).
  Tolerance 5e-3.
- the same with flash attention off and an f32 KV cache: worst 6e-7, i.e. the decoder
  graph itself is exact; tolerance 1e-5. Flash attention, not the KV type, is what costs
  precision on CPU (f32 KV with flash attention measures the same 8e-4 as f16 KV).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from vlmexport.core.errors import MissingDependencyError, VlmexportError
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


def llama_cpp_or_skip():
    if not lb.llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install 'vlmexport[llamacpp]')")


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def export(model, tmp_path_factory, tokenizer_path, name: str, outtype: str = "f32"):
    from vlmexport.exporter.gguf_writer import export_gguf
    from vlmexport.models.checkpoint import save_pretrained

    d = tmp_path_factory.mktemp(name) / name
    save_pretrained(model, d, tokenizer_path, PreprocessConfig(image_size=model.config.vision_config.image_size))
    return export_gguf(d, d / "gguf", outtype)


@pytest.fixture(scope="module")
def cog(tiny_model, tmp_path_factory, tokenizer_path):
    """(torch model, GGUFExport) of a tiny jittered cogvlm."""
    llama_cpp_or_skip()
    # seed 97 (searched over 20..199): along the greedy generations below, torch's top-1 / top-2
    # logit gap is never under 1.7e-2 of the largest logit, 7x the worst logit error measured:
    # greedy tokens cannot flip
    model = tiny_model("cogvlm", seed=97, jitter=True)
    return model, export(model, tmp_path_factory, tokenizer_path, "cogvlm")


@pytest.fixture(scope="module")
def session(cog):
    with lb.LlamaCppSession(cog[1].text, cog[1].mmproj, n_ctx=N_CTX, n_threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def exact_session(cog):
    """Flash attention off and an f32 KV cache: llama.cpp's decoder then matches to float32 rounding."""
    with lb.LlamaCppSession(cog[1].text, None, n_ctx=N_CTX, n_threads=1, kv_type="f32", flash_attn=False) as s:
        yield s


def pixels(n: int, seed: int = 0, cfg=PreprocessConfig(image_size=32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([preprocess(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8), cfg) for _ in range(n)])


def torch_session(model):
    from vlmexport.runtimes.torch_session import TorchSession

    return TorchSession(model, max_length=N_CTX)


def two_image_layout(model):
    t = model.image_tokens()
    return build_layout([TextPiece((1, 5, 6)), ImagePiece(t), TextPiece((7, 8)), ImagePiece(t),
                         TextPiece((9, 10, 11, 12))], model.config.expert_routing, model.config.position_ids)


# ----------------------------------------------------------------------- parity
@pytest.mark.llamacpp
def test_default_threads_are_the_physical_cores(cog):
    """Without n_threads, llama.cpp gets one thread per physical core (a VM's vCPUs without SMT
    siblings count one each), not half the CPUs."""
    from vlmexport.runtimes.environment import physical_cores

    with lb.LlamaCppSession(cog[1].text, None, n_ctx=N_CTX) as s:
        assert s.n_threads == physical_cores()


@pytest.mark.llamacpp
def test_libmtmd_sees_exactly_our_pixels(session):
    """Our pixels -> 8-bit image -> libmtmd's own normalisation gives back our pixels bit for bit."""
    px = pixels(3, seed=1)
    u8 = session.pixels_to_u8(px)
    assert u8.dtype == np.uint8 and u8.shape == (3, 32, 32, 3)
    back = (u8.astype(np.float32) / np.float32(255.0) - session.image_mean) / session.image_std
    np.testing.assert_array_equal(back.transpose(0, 3, 1, 2), px)


@pytest.mark.llamacpp
def test_pixels_off_the_8_bit_grid_warn_once_per_session(session, caplog):
    session._warned_pixels = False
    px = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger=lb.__name__):
        session.pixels_to_u8(px)
        session.pixels_to_u8(px)
    assert sum("takes 8-bit images" in r.message for r in caplog.records) == 1


@pytest.mark.llamacpp
def test_image_embeddings_match_torch(cog, session):
    model, _ = cog
    px = pixels(2, seed=2)
    ours = session.encode_images(px)
    ref = torch_session(model).encode_images(px)
    assert ours.shape == ref.shape == (2, model.image_tokens(), model.config.hidden_size)
    assert rel(ours, ref) < EMBED_RTOL
    # boi / eoi are copied from the file: exact
    np.testing.assert_array_equal(ours[:, 0], ref[:, 0])
    np.testing.assert_array_equal(ours[:, -1], ref[:, -1])


@pytest.mark.llamacpp
def test_prefill_and_decode_logits_match_torch_with_two_images(cog, session, exact_session):
    model, _ = cog
    ref = torch_session(model)
    emb = ref.encode_images(pixels(2, seed=3))
    lay = two_image_layout(model)
    expected = [ref.prefill(lay, emb)]
    expected += [ref.decode(t, lay.next_position + i) for i, t in enumerate((13, 14, 15))]
    for sess, tol in ((session, LOGIT_RTOL), (exact_session, EXACT_RTOL)):
        got = [sess.prefill(lay, emb)] + [sess.decode(t, lay.next_position + i) for i, t in enumerate((13, 14, 15))]
        for step, (g, e) in enumerate(zip(got, expected)):
            assert rel(g, e) < tol, f"step {step}: relative difference {rel(g, e):.2e} >= {tol}"
            assert int(np.argmax(g)) == int(np.argmax(e))
    # the whole llama.cpp path: libmtmd embeddings + llama.cpp's decoder
    full = session.prefill(lay, session.encode_images(pixels(2, seed=3)))
    assert rel(full, expected[0]) < LOGIT_RTOL


class Recording:
    """A session proxy that keeps every logits vector the generation loop samples from."""

    def __init__(self, inner):
        self.inner, self.logits = inner, []
        self.max_length = inner.max_length

    def encode_images(self, px):
        return self.inner.encode_images(px)

    def reset(self):
        self.inner.reset()

    def prefill(self, layout, embeds):
        self.logits.append(self.inner.prefill(layout, embeds))
        return self.logits[-1]

    def decode(self, token, position):
        self.logits.append(self.inner.decode(token, position))
        return self.logits[-1]


def top2_gap(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float((top[1] - top[0]) / np.abs(logits).max())


@pytest.mark.llamacpp
def test_greedy_pipeline_generation_equals_torch(cog, session, tokenizer, preprocess_config, images):
    from vlmexport.runtimes.torch_backend import pipeline_from_model

    model, _ = cog
    torch_pipe = pipeline_from_model(model, tokenizer, preprocess_config, max_length=N_CTX)
    llama_pipe = Pipeline(session, tokenizer, torch_pipe.template, preprocess_config,
                          replace(torch_pipe.spec, max_length=session.max_length), backend="llamacpp")
    cfg = GenerationConfig(max_new_tokens=10)  # no stop tokens: a tiny random model rarely stops
    cases = [("What is in the image?", images[:1]), ("<image> What colour is <image>?", images[:2]),
             ("Count the shapes.", images[1:2]), ("Describe <image> briefly", images[2:3]),
             ("Say something.", [])]
    for prompt, imgs in cases:
        tokens = []
        ref = Recording(torch_pipe.session)
        for pipe, sess in ((torch_pipe, ref), (llama_pipe, llama_pipe.session)):
            layout, px = pipe.prepare([Turn(user=prompt, images=len(imgs))], imgs)
            emb = sess.encode_images(px) if px is not None else None
            tokens.append(list(generate_tokens(sess, layout, emb, cfg)))
        # the premise: no near-tie that llama.cpp's ~2e-3 logit error could flip
        assert min(top2_gap(lg) for lg in ref.logits) > 3 * LOGIT_RTOL, f"{prompt!r}: pick a model without near-ties"
        assert len(tokens[0]) == 10 and tokens[1] == tokens[0], prompt
    prompt, imgs = cases[1]
    assert llama_pipe.generate(prompt, imgs, max_new_tokens=8) == torch_pipe.generate(prompt, imgs, max_new_tokens=8)


@pytest.mark.llamacpp
def test_logits_row_regression(cog, exact_session):
    """llama.cpp's cogvlm graph does not select output rows: asking for the last position's logits
    of a multi-token batch returns the *first* token's row. The backend must not rely on it."""
    model, _ = cog
    ids = [1, 5, 6, 7, 8, 9, 10]
    with torch.no_grad():
        full = model(torch.tensor([ids]), torch.arange(len(ids))[None],
                     torch.zeros(1, len(ids), dtype=torch.long)).numpy()[0]
    s = exact_session
    s.reset()
    s._decode_tokens(ids, range(len(ids)), [False] * (len(ids) - 1) + [True])  # what mtmd-cli / the server do
    naive = s._logits(-1)
    assert rel(naive, full[-1]) > 0.1  # the wrong row ...
    assert rel(naive, full[0]) < EXACT_RTOL  # ... is the first token's
    got = s.prefill(build_layout([TextPiece(tuple(ids))]), None)
    assert rel(got, full[-1]) < EXACT_RTOL
    # the same holds when the prompt ends with an image chunk (an embedding batch)
    ref = torch_session(model)
    emb = ref.encode_images(pixels(1, seed=4))
    lay = build_layout([TextPiece((1, 5)), ImagePiece(model.image_tokens())])
    assert rel(s.prefill(lay, emb), ref.prefill(lay, emb)) < EXACT_RTOL


@pytest.mark.llamacpp
def test_small_ubatches_and_gpu_request(cog, exact_session, caplog):
    """Runs longer than n_ubatch (an image chunk of 18 embeddings in 8-position steps) give the
    same logits; n_gpu_layers on a CPU-only build is ignored with a warning."""
    model, out = cog
    emb = torch_session(model).encode_images(pixels(2, seed=6))
    lay = two_image_layout(model)
    want = exact_session.prefill(lay, emb)
    with caplog.at_level(logging.WARNING, logger=lb.__name__):
        with lb.LlamaCppSession(out.text, None, n_ctx=N_CTX, n_threads=1, kv_type="f32", flash_attn=False,
                                n_ubatch=8, n_gpu_layers=99) as s:
            assert rel(s.prefill(lay, emb), want) < EXACT_RTOL
            offload = s._lib.llama_supports_gpu_offload()
    assert offload or "without a GPU backend" in caplog.text


@pytest.mark.llamacpp
def test_reset_and_context_limits(cog, exact_session):
    model, _ = cog
    s = exact_session
    lay = build_layout([TextPiece((1, 5, 6, 7))])
    first = s.prefill(lay, None)
    s.decode(9, lay.next_position)
    s.reset()
    np.testing.assert_array_equal(s.prefill(lay, None), first)
    with pytest.raises(ValueError, match="context holds"):
        s.prefill(build_layout([TextPiece(tuple([5] * (N_CTX + 1)))]), None)
    with pytest.raises(ValueError, match="image positions"):
        s.prefill(build_layout([TextPiece((1,)), ImagePiece(model.image_tokens())]), None)
    with pytest.raises(VlmexportError, match="without an mmproj"):
        s.encode_images(pixels(1))


@pytest.mark.llamacpp
def test_hf_cogvlm_layouts_run_in_llama_cpps_semantics_with_a_warning(cog, exact_session, caplog):
    """An hf_cogvlm layout (repeated image positions, eoi on the language expert) runs as llama.cpp's
    own cogvlm semantics (sequential positions, boi..eoi on the visual expert), decode positions
    included, with one warning that says so; not the third semantics that repeated positions give
    llama.cpp's position-based mask."""
    model, _ = cog
    pieces = [TextPiece((1, 5)), ImagePiece(model.image_tokens()), TextPiece((6, 7))]
    lay = build_layout(pieces, "hf_cogvlm", "hf_cogvlm")
    runs = build_layout(pieces, *lb.LLAMA_CPP_SEMANTICS)
    assert lay.next_position < len(lay) and runs.next_position == len(runs)
    emb = np.random.default_rng(3).normal(size=(1, model.image_tokens(), model.config.hidden_size)).astype(np.float32)
    ref = torch_session(model)
    s = exact_session
    s._warned_routing = False
    with caplog.at_level(logging.WARNING, logger=lb.__name__):
        got = [s.prefill(lay, emb), s.decode(9, lay.next_position), s.decode(10, lay.next_position + 1)]
        s.prefill(lay, emb)
    want = [ref.prefill(runs, emb), ref.decode(9, runs.next_position), ref.decode(10, runs.next_position + 1)]
    for a, b in zip(got, want):
        assert rel(a, b) < EXACT_RTOL
    assert rel(got[0], ref.prefill(lay, emb)) > 10 * EXACT_RTOL  # and that is not the hf_cogvlm reference
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    msg = caplog.records[0].message
    assert "llama.cpp runs its own semantics" in msg and "1 routed to the other expert" in msg
    assert f"{int((lay.position_ids != np.arange(len(lay))).sum())} position(s) on another position id" in msg


@pytest.mark.llamacpp
@pytest.mark.parametrize("square", [False, True], ids=["vit-mlp-2x", "vit-mlp-square"])
def test_llava_decoder_matches_and_the_mmproj_keeps_the_patches_in_order(tiny_model, tmp_path_factory,
                                                                         tokenizer_path, square):
    """A plain LLaMA decoder (q/k permuted for llama.cpp's interleaved RoPE) matches torch. The
    mmproj is written without CLS (exporter/gguf.py, DELIBERATE 4): llama.cpp 0.3.36's llava graph
    then returns every patch in order; what remains is the ViT running without the CLS token.
    Measured on this seed: 7.6e-3 of max|reference| (with CLS, the same graph returned patches
    2..n then CLS: a relative error of ~1). The bound is loose on purpose: it separates "aligned,
    without CLS" from "shifted", not a parity claim. ``square``: a ViT MLP with intermediate ==
    hidden, where llama.cpp swaps ffn_up / ffn_down whatever their names (the writer uses the
    legacy names then)."""
    llama_cpp_or_skip()
    from vlmexport.models import VisionConfig

    vision = {"vision_config": VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=48,
                                            num_hidden_layers=3, num_heads=6)} if square else {}
    model = tiny_model("llava", seed=6, jitter=True, **vision)
    with pytest.warns(UserWarning, match="CLS"):
        out = export(model, tmp_path_factory, tokenizer_path, "llava-square" if square else "llava")
    ref = torch_session(model)
    px = pixels(2, seed=5)
    emb = ref.encode_images(px)
    lay = build_layout([TextPiece((1, 5, 6)), ImagePiece(model.image_tokens()), TextPiece((7, 8, 9))])
    with lb.LlamaCppSession(out.text, out.mmproj, n_ctx=N_CTX, n_threads=1, kv_type="f32", flash_attn=False,
                            expected_arch="llama") as s:
        assert rel(s.prefill(lay, emb[:1]), ref.prefill(lay, emb[:1])) < EXACT_RTOL
        got = s.encode_images(px)
    with torch.no_grad():  # the same ViT without its CLS token, through the projector
        t = model.vision_tower
        h = t.pre_layrnorm(t.embeddings(torch.tensor(px))[:, 1:])
        for layer in t.encoder.layers[: max(model.vision_encoder_module().feature_layers)]:
            h = layer(h)
        no_cls = model.multi_modal_projector(h).numpy()
    scale = np.abs(emb).max()
    assert got.shape == emb.shape
    assert np.abs(got - no_cls).max() / scale < EMBED_RTOL  # llama.cpp computes exactly "no CLS"
    assert np.abs(got - emb).max() / scale < 0.1  # aligned: patch i is patch i
    shifted = np.abs(got[:, :-1] - emb[:, 1:]).max() / scale
    assert shifted > 0.1


# ---------------------------------------------------------------------- bad input
@pytest.mark.llamacpp
def test_truncated_gguf_is_a_clear_error(cog, tmp_path):
    _, out = cog
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.text.read_bytes()[: out.text.stat().st_size - 1000])
    with pytest.raises(lb.GGUFFileError, match=r"cut\.gguf: .*truncated.*re-export") as e:
        lb.LlamaCppSession(cut, out.mmproj, n_ctx=N_CTX)
    assert "\n" not in str(e.value)
    header = tmp_path / "header.gguf"
    header.write_bytes(out.text.read_bytes()[:200])
    with pytest.raises(lb.GGUFFileError, match=r"header\.gguf: .*truncated"):
        lb.LlamaCppSession(header, out.mmproj, n_ctx=N_CTX)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(lb.GGUFFileError, match="not a GGUF file"):
        lb.LlamaCppSession(notgguf, n_ctx=N_CTX)
    with pytest.raises(lb.GGUFFileError, match="no such text GGUF"):
        lb.LlamaCppSession(tmp_path / "missing.gguf", n_ctx=N_CTX)


@pytest.mark.llamacpp
def test_wrong_architecture_and_swapped_files_are_clear_errors(cog):
    _, out = cog
    with pytest.raises(lb.GGUFFileError, match=r"holds a 'cogvlm' model but a 'llama' text model is expected"):
        lb.LlamaCppSession(out.text, out.mmproj, n_ctx=N_CTX, expected_arch="llama")
    with pytest.raises(lb.GGUFFileError, match="this is an mmproj"):
        lb.LlamaCppSession(out.mmproj, out.text, n_ctx=N_CTX)
    with pytest.raises(lb.GGUFFileError, match=r"not an mmproj"):
        lb.LlamaCppSession(out.text, out.text, n_ctx=N_CTX)


@pytest.mark.llamacpp
def test_mmproj_of_another_model_is_a_clear_error(cog, tiny_model, tmp_path_factory, tokenizer_path):
    _, out = cog
    other = tiny_model("cogvlm", seed=9, hidden_size=96, intermediate_size=160)
    other_out = export(other, tmp_path_factory, tokenizer_path, "wide-cogvlm", "f16")
    with pytest.raises(lb.GGUFFileError, match=r"mmproj-model\.f16\.gguf: its image embeddings are 96 wide but the "
                                               r"text model model\.f32\.gguf expects 64.*another model") as e:
        lb.LlamaCppSession(out.text, other_out.mmproj, n_ctx=N_CTX)
    assert str(other_out.mmproj) in str(e.value) and "\n" not in str(e.value)


def test_missing_llama_cpp_is_a_clear_error(monkeypatch, tmp_path):
    # a None entry in sys.modules makes `import llama_cpp` (and importlib) raise ImportError
    for mod in ("llama_cpp", "llama_cpp.llama_cpp", "llama_cpp.mtmd_cpp"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert lb.llamacpp_available() is False
    with pytest.raises(MissingDependencyError, match=r"pip install 'vlmexport\[llamacpp\]'") as e:
        lb.LlamaCppSession(tmp_path / "model.gguf")
    assert isinstance(e.value, VlmexportError) and "\n" not in str(e.value)
    assert str(e.value).startswith("llama-cpp-python is not installed")


def test_runtime_imports_neither_torch_nor_models():
    code = ("import sys, vlmexport.runtimes.llamacpp_backend; "
            "bad = [m for m in ('torch', 'vlmexport.models', 'vlmexport.exporter', 'llama_cpp') if m in sys.modules]; "
            "sys.exit(repr(bad) if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.llamacpp
def test_amx_probe_survives_a_file_without_quantized_weights(cog):
    """The repacking probe must only fail where llama.cpp's kernels do: on an f32 file no AMX
    code runs, so it has to exit 0 (it used to hand llama.cpp a log callback that Python then
    freed, and crashed on any file)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", lb._PROBE, str(cog[1].text)], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
