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
from .llamacpp_backend import GGUFFileError, extra_buffer_types, read_gguf_info
from .llamacpp_lib import LOG_SINK, init_backend


@dataclass
class AnchorTiming:
    ttft_ms: float  # prefill of the text prompt + sampling its first token (median of the repeats)
    decode_ms_per_token: float  # one llama_decode of one token + greedy sampling (median over repeats)
    load_s: float
    prompt_tokens: int
    tokens: list[int]  # the greedy continuation of the last repeat (a check that it decoded)


def time_text_gguf(path: str | Path, prompt_tokens: int, decode_tokens: int, repeats: int = 3,
                   threads: int | None = None) -> AnchorTiming:
    """Time raw llama.cpp on ``path``: prefill of ``prompt_tokens`` text tokens and ``decode_tokens``
    greedy steps, ``repeats`` times (after one warm-up), medians returned."""
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise VlmexportError("raw llama.cpp timing needs at least one prompt token, one decode step and one repeat")
    import ctypes

    lib, _ = init_backend()
    info = read_gguf_info(path, "text GGUF")
    quantized = info.get("general.file_type", 1) not in (0, 1, 32)  # f32, f16, bf16
    mp = lib.llama_model_default_params()
    if not extra_buffer_types(info if quantized else None):
        mp.use_extra_bufts = False
    t0 = time.perf_counter()
    model = lib.llama_model_load_from_file(str(info.path).encode(), mp)
    if not model:
        raise GGUFFileError(f"{info.path}: llama.cpp could not load this text GGUF ({LOG_SINK.take() or 'no detail'})")
    ctx = sampler = None
    try:
        cp = lib.llama_context_default_params()
        cp.n_ctx = prompt_tokens + decode_tokens + 1
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        ctx = lib.llama_init_from_model(model, cp)
        if not ctx:
            raise GGUFFileError(f"{info.path}: llama.cpp could not create a context ({LOG_SINK.take() or 'no detail'})")
        load_s = time.perf_counter() - t0
        vocab = lib.llama_model_get_vocab(model)
        n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        memory = lib.llama_get_memory(ctx)
        sampler = lib.llama_sampler_init_greedy()
        prompt = (ctypes.c_int32 * prompt_tokens)(*[5 + (k % min(200, n_vocab - 5)) for k in range(prompt_tokens)])
        one = (ctypes.c_int32 * 1)()

        def decode(batch) -> None:
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with status {rc} ({LOG_SINK.take() or 'no detail'})")

        ttfts, steps, out = [], [], []
        for r in range(repeats + 1):  # the first run warms up (page faults, repacking, thread pool)
            lib.llama_memory_clear(memory, True)
            t0 = time.perf_counter()
            decode(lib.llama_batch_get_one(prompt, prompt_tokens))
            tok = lib.llama_sampler_sample(sampler, ctx, -1)
            t1 = time.perf_counter()
            out = [int(tok)]
            for _ in range(decode_tokens):
                one[0] = tok
                decode(lib.llama_batch_get_one(one, 1))
                tok = lib.llama_sampler_sample(sampler, ctx, -1)
                out.append(int(tok))
            t2 = time.perf_counter()
            if r:
                ttfts.append((t1 - t0) * 1000)
                steps.append((t2 - t1) * 1000 / decode_tokens)
        return AnchorTiming(ttft_ms=statistics.median(ttfts), decode_ms_per_token=statistics.median(steps),
                            load_s=load_s, prompt_tokens=prompt_tokens, tokens=out)
    finally:
        if sampler:
            lib.llama_sampler_free(sampler)
        if ctx:
            lib.llama_free(ctx)
        lib.llama_model_free(model)
