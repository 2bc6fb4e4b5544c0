"""Raw llama.cpp timing (runtimes/llamacpp_anchor.py), the anchor row of ``vlmexport bench``:
it must decode what the llamacpp backend decodes, so that the two rows time the same work."""

from __future__ import annotations

import numpy as np
import pytest

from vlmexport.core.errors import VlmexportError
from vlmexport.core.layout import TextPiece, build_layout
from vlmexport.runtimes import llamacpp_backend as lb

from test_llamacpp_backend import N_CTX, export, llama_cpp_or_skip


@pytest.mark.llamacpp
def test_raw_llama_cpp_decodes_what_the_backend_decodes(tiny_model, tmp_path_factory, tokenizer_path):
    """A plain LLaMA GGUF (llava's decoder: llama.cpp selects the last row's logits, which its
    cogvlm graph does not; see test_logits_row_regression): llama.cpp's own greedy loop on a text
    prompt yields the backend's greedy tokens."""
    llama_cpp_or_skip()
    from vlmexport.runtimes.llamacpp_anchor import time_text_gguf

    model = tiny_model("llava", seed=6, jitter=True)
    with pytest.warns(UserWarning, match="CLS"):
        out = export(model, tmp_path_factory, tokenizer_path, "llava-anchor")
    n_prompt, n_decode = 12, 6
    t = time_text_gguf(out.text, n_prompt, n_decode, repeats=2, threads=1)
    assert t.ttft_ms > 0 and t.decode_ms_per_token > 0 and t.load_s > 0 and t.prompt_tokens == n_prompt
    assert len(t.tokens) == n_decode + 1

    ids = [5 + k for k in range(n_prompt)]  # the anchor's prompt (5 + k % 200)
    with lb.LlamaCppSession(out.text, None, n_ctx=N_CTX, n_threads=1, expected_arch="llama") as s:
        tok = int(np.argmax(s.prefill(build_layout([TextPiece(tuple(ids))]), None)))
        want = [tok]
        for k in range(n_decode):
            tok = int(np.argmax(s.decode(tok, n_prompt + k)))
            want.append(tok)
    assert t.tokens == want


@pytest.mark.llamacpp
def test_raw_llama_cpp_bad_arguments(tmp_path):
    llama_cpp_or_skip()
    from vlmexport.runtimes.llamacpp_anchor import time_text_gguf

    with pytest.raises(VlmexportError, match="at least one"):
        time_text_gguf(tmp_path / "x.gguf", 0, 4)
    with pytest.raises(lb.GGUFFileError):
        (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 20)
        time_text_gguf(tmp_path / "x.gguf", 4, 4)
