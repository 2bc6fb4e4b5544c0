"""Raw llama.cpp on a text GGUF: the anchor row of ``vlmexport bench``.

What a llama.cpp user gets from the same file, with none of this project's code between the
two: llama.cpp's default model and context parameters (``n_ctx`` = prompt + generated tokens,
as ``llama-bench`` sizes it; ``n_batch`` 2048, ``n_ubatch`` 512, flash attention "auto", f16
KV cache), a text-only prompt handed over with ``llama_batch_get_one`` and greedy decoding with
llama.cpp's own sampler, the loop of llama.cpp's ``simple`` example. Each ctypes call costs
microseconds; a decode step costs milliseconds.

One deviation from the defaults: weight repacking into the CPU's extra buffer types follows
:func:`~vlmexport.runtimes.llamacpp_backend.extra_buffer_types`, as the llamacpp backend does,
so that a machine whose AMX faults (module doc there) runs the anchor instead of crashing, and
both rows run the same kernels.

The llamacpp backend's prompt holds an image (embeddings through the visual expert); this
one is text of the same number of positions, so the two differ by what the image chunk costs
llama.cpp, not by the decode step, which is text in both.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import VlmexportError
from .llamacpp_backend import GGUFFileError, load_text_model, read_gguf_info
from .llamacpp_lib import LOG_SINK, init_backend


@dataclass
class AnchorTiming:
    ttft_ms: float  # prefill of the text prompt + sampling its first token (median of the repeats)
    decode_ms_per_token: float  # one llama_decode of one token + greedy sampling (median over repeats)
    load_s: float
    prompt_tokens: int
    tokens: list[int]  # the greedy continuation of the last repeat (a check that it decoded)


class RawTextModel:
    """A text GGUF loaded into llama.cpp with its default context parameters (``n_ctx`` = the
    longest prompt + generation it will run, as ``llama-bench`` sizes it) and its greedy sampler;
    :meth:`run` times one prompt and its continuation. Close it (or use ``with``)."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None = None):
        import ctypes

        self._ctypes = ctypes
        self._lib = lib = init_backend()[0]
        info = read_gguf_info(path, "text GGUF")
        self.ctx = self.sampler = None
        t0 = time.perf_counter()
        self.model = load_text_model(lib, info)
        try:
            cp = lib.llama_context_default_params()
            cp.n_ctx = n_ctx
            if threads:
                cp.n_threads = cp.n_threads_batch = threads
            self.ctx = lib.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise GGUFFileError(f"{info.path}: llama.cpp could not create a context "
                                    f"({LOG_SINK.take() or 'no detail'})")
        except BaseException:
            self.close()
            raise
        self.load_s = time.perf_counter() - t0
        self.n_ctx = n_ctx
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        self.memory = lib.llama_get_memory(self.ctx)
        self.sampler = lib.llama_sampler_init_greedy()

    def _decode(self, batch) -> None:
        rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} ({LOG_SINK.take() or 'no detail'})")

    def run(self, prompt_tokens: int, decode_tokens: int) -> tuple[float, float, list[int]]:
        """``(TTFT ms, decode ms per token, tokens)`` of a text prompt of ``prompt_tokens`` ids
        (5 + k % 200) and ``decode_tokens`` greedy steps after it."""
        if prompt_tokens < 1 or decode_tokens < 1 or prompt_tokens + decode_tokens >= self.n_ctx + 1:
            raise VlmexportError(f"raw llama.cpp timing needs at least one prompt token and one decode step, "
                                 f"{prompt_tokens} + {decode_tokens} within the context of {self.n_ctx}")
        lib, ct = self._lib, self._ctypes
        prompt = (ct.c_int32 * prompt_tokens)(*[5 + (k % min(200, self.n_vocab - 5)) for k in range(prompt_tokens)])
        one = (ct.c_int32 * 1)()
        lib.llama_memory_clear(self.memory, True)
        t0 = time.perf_counter()
        self._decode(lib.llama_batch_get_one(prompt, prompt_tokens))
        tok = lib.llama_sampler_sample(self.sampler, self.ctx, -1)
        t1 = time.perf_counter()
        out = [int(tok)]
        for _ in range(decode_tokens):
            one[0] = tok
            self._decode(lib.llama_batch_get_one(one, 1))
            tok = lib.llama_sampler_sample(self.sampler, self.ctx, -1)
            out.append(int(tok))
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000 / decode_tokens, out

    def close(self) -> None:
        lib = self._lib
        if self.sampler:
            lib.llama_sampler_free(self.sampler)
            self.sampler = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "RawTextModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def time_text_gguf(path: str | Path, prompt_tokens: int, decode_tokens: int, repeats: int = 3,
                   threads: int | None = None) -> AnchorTiming:
    """Time raw llama.cpp on ``path``: prefill of ``prompt_tokens`` text tokens and ``decode_tokens``
    greedy steps, ``repeats`` times (after one warm-up), medians returned."""
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise VlmexportError("raw llama.cpp timing needs at least one prompt token, one decode step and one repeat")
    with RawTextModel(path, prompt_tokens + decode_tokens + 1, threads) as m:
        m.run(prompt_tokens, decode_tokens)  # warm-up (page faults, repacking, thread pool)
        runs = [m.run(prompt_tokens, decode_tokens) for _ in range(repeats)]
        return AnchorTiming(ttft_ms=statistics.median(r[0] for r in runs),
                            decode_ms_per_token=statistics.median(r[1] for r in runs), load_s=m.load_s,
                            prompt_tokens=prompt_tokens, tokens=runs[-1][2])
