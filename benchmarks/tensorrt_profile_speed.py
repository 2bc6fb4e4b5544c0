"""The TensorRT-profile graphs on onnxruntime CPU next to the contrib-op onnx graphs.

What the profile costs where it is only validated (a CPU): decomposed attention over the
whole static KV buffer, a ScatterND copy of every buffer per step, both experts on every
prefill position. Same bundle (``--format onnx,tensorrt``), same process, interleaved
repeats, medians:

- image encode ms (vision encoder + connector, one image),
- prefill ms of one image + a short question,
- decode tokens/s over ``--tokens`` steps,
- routing cost: the routed prefill graph against the routing-free graph on a text-only
  prompt of the same length (the second expert's share of a prefill).

    python benchmarks/tensorrt_profile_speed.py --bundle /tmp/trt-demo   # builds the demo there if missing
    python benchmarks/tensorrt_profile_speed.py --bundle B --precision fp16 --threads 2

Not a test: the numbers depend on the machine and its load (printed before and after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np


def _timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the demo model)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()

    from vlmexport.bundle import Bundle
    from vlmexport.core.layout import build_layout
    from vlmexport.core.prompt import Turn, render
    from vlmexport.core.tokenizer import Tokenizer
    from vlmexport.pipeline.build import build
    from vlmexport.pipeline.validate import decoder_facts
    from vlmexport.runtimes.onnxruntime_backend import OrtModelSession
    from vlmexport.runtimes.tensorrt_profile import (
        OrtProfileExecutor,
        ProfileFiles,
        StaticCacheSession,
    )

    if not (a.bundle / "manifest.json").is_file():
        build(a.model, a.bundle, formats=("onnx", "tensorrt"), precisions=(a.precision,), reference=False,
              validate=False)
    b = Bundle.open(a.bundle, verify="none")
    m = b.section("model")
    f = lambda part, fmt: b.file(b.find(part, fmt, a.precision).file)
    contrib = OrtModelSession(f("text_decoder", "onnx"), f("token_embedding", "onnx"), decoder_facts(m),
                              vision_encoder_path=f("vision_encoder", "onnx"), connector_path=f("connector", "onnx"),
                              intra_op_num_threads=a.threads, providers=["CPUExecutionProvider"])
    td = b.find("text_decoder", "tensorrt", a.precision)
    decode = td.extra.get("decode_graph")
    files = ProfileFiles(f("text_decoder", "tensorrt"), f("token_embedding", "tensorrt"),
                         f("vision_encoder", "tensorrt"), f("connector", "tensorrt"), b.file(decode) if decode else None)
    ex = OrtProfileExecutor(files, m["num_layers"], m["num_kv_heads"], m["head_dim"], m["max_length"],
                            threads=a.threads)
    profile = StaticCacheSession(ex, files.token_embedding, m["hidden_size"], m["vocab_size"])

    tok = Tokenizer(b.file(b.section("tokenizer")["file"]))
    from vlmexport.core.prompt import ChatTemplate

    template = ChatTemplate.from_dict(b.section("chat_template"))
    pieces = render(template, [Turn(user="<image> What colour is the largest shape in the picture?", images=1)],
                    tok, m["image_tokens"]).pieces
    lay = build_layout(pieces, m["expert_routing"], m["position_ids"], image_pad_id=m["pad_token_id"])
    size = b.section("preprocessing")["image_size"]
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    text_lay = build_layout([type(pieces[0])(tuple(range(3, 3 + len(lay))))], m["expert_routing"],
                            m["position_ids"])

    def decode_run(s):
        def run():
            s.prefill(lay, emb)
            pos = lay.next_position
            for i in range(a.tokens):
                s.decode(5 + i % 50, pos + i)
        return run

    emb = contrib.encode_images(px)
    rows: dict[str, dict[str, list[float]]] = {"contrib-op onnx": {}, "tensorrt profile": {}}
    print(f"load average before: {os.getloadavg()}; {len(lay)} prompt positions, {a.tokens} decode steps, "
          f"{a.threads} thread(s), {a.precision}")
    for _ in range(a.repeats):
        for name, s in (("contrib-op onnx", contrib), ("tensorrt profile", profile)):
            r = rows[name]
            r.setdefault("encode ms", []).append(1e3 * _timed(lambda: s.encode_images(px), 1)[0])
            r.setdefault("prefill ms", []).append(1e3 * _timed(lambda: s.prefill(lay, emb), 1)[0])
            t = _timed(decode_run(s), 1)[0] - r["prefill ms"][-1] / 1e3
            r.setdefault("decode tok/s", []).append(a.tokens / t)
        # routing cost: routed vs routing-free graph on an all-text prompt of the same length
        if decode:
            e = np.take(profile.embedding, text_lay.input_ids, axis=0).astype(ex.dtype)[None]
            p_ids, tt = text_lay.position_ids[None], text_lay.token_type[None]
            rows["tensorrt profile"].setdefault("routed prefill (text) ms", []).append(
                1e3 * _timed(lambda: ex.step(e, p_ids, tt, 0), 1)[0])
            rows["tensorrt profile"].setdefault("routing-free prefill (text) ms", []).append(
                1e3 * _timed(lambda: ex.step(e, p_ids, None, 0), 1)[0])
    for name, r in rows.items():
        print(name + ": " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in r.items()))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
