"""Where an onnxruntime int4 decode step and the time to first token go, on a built bundle
(docs/results.md, "CPU speed against llama.cpp"). Twelve measurements, each printed on its own line:

- ``kernels``: a graph of only one decode step's MatMulNBits (the language expert's projections
  of every layer and the LM head, at the bundle decoder's shapes and block size, random codes)
  against the same with a 4-bit LM head, and the LM head alone at 8 and 4 bits; spinning on,
  the bundle's thread count. Says how much of a step onnxruntime's 4-bit kernel takes by itself.
- ``attention``: the decoder's GroupQueryAttention nodes alone at the benchmark's context length,
  with the KV buffer at the model's context and at the prompt's length.
- ``variants``: the loaded int4 pipeline's decode steps with the routed graph, the decode graph
  sleeping and the decode graph spinning, interleaved over rounds in one process (medians).
- ``versus``: onnxruntime int4 against raw llama.cpp q4_0 (the bundle's GGUF), interleaved rounds
  in one process, the median of the per-round ratios.
- ``ttft-versus``: time to first token of torch and of onnxruntime fp32 / int4 (as loaded by default,
  and with ``cpu_prefill="off"``), interleaved rounds in one process, the median of the per-round
  ratios to torch.
- ``ttft``: vision encoder and connector timed alone, the decoder prefill timed and profiled
  per layer, for the given precisions.
- ``blocks``: the ``kernels`` graph (one decode step's MatMulNBits, 8-bit LM head) at block 32 and
  128 with accuracy level 4, alternating in two rounds, then at the bundle's block with level 1
  (fp32 compute); spinning on. Whether the CPU default block and level hold on this CPU.
- ``gemm``: one prefill projection (the image tokens' rows through the decoder's gate projection)
  through each kernel a recipe can put there: fp32 MatMul, MatMulNBits at 4 bits (accuracy level
  4, int8 compute, and level 1, fp32 compute) and at 8 bits, onnxruntime's int8 GEMM
  (DynamicQuantizeMatMul with int8 weights: MLAS's QGEMM, the kernel family under the int8
  vision parts' QLinearMatMul), and torch's fp32 matmul; GFLOP/s each, spinning off (as a
  prefill runs). Comparing the rows tells whether int8 compute beats fp32 on this CPU.
- ``last-layer``: the decoder's prefill of the benchmark prompt with its last layer on each row's last
  position only (the default) and on every position (``last_layer_all_rows=1``, as before that
  existed), alternating in one profiled session: whole runs and the last layer's kernels (medians),
  the median of the per-round ratios and the logits' difference, for the given precisions.
- ``ops``: every op type's share of the decoder prefill and of the vision encoder, profiled with the
  runtime's own session settings (spinning, the int8 vision parts' disabled optimizer), the first
  run left out, for the given precisions (``ttft`` prints the top four of the prefill).
- ``alternatives``: two rewrites of the prefill measured against what the graph does, alternating
  rounds in one process: gate and up as one fp32 MatMul plus a Split against two MatMuls (the image
  rows, with SwiGLU's tail), and ONNX's opset-23 ``Attention`` (``is_causal``) against one
  GroupQueryAttention at the prompt's length, KV buffer bound in place as the runtime binds it.
- ``spin``: the image encode and the prefill under each spin mode (``"off"``; the default
  ``"decode"``: the decoder sessions spin, the prompt's included; ``"all"``: the vision parts too),
  interleaved rounds, for the given precisions: encode "all" against "decode", prefill "decode"
  against "off".

    python benchmarks/cpu_decode_breakdown.py qa                        # every measurement, int4 and fp32
    python benchmarks/cpu_decode_breakdown.py qa --only kernels,attention

Not a test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlmexport.bundle import Bundle
from vlmexport.pipeline.bench import bench_layout, prefill_flops
from vlmexport.runtimes.loader import load
from vlmexport.runtimes.onnxruntime_backend import KV_CHUNK, session_options


def _median_ms(fn, steps: int = 32, rounds: int = 7) -> float:
    for _ in range(5):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        out.append((time.perf_counter() - t0) / steps * 1000)
    return statistics.median(out)


def _decoder_facts(b: Bundle) -> dict:
    m = b.section("model")
    q = b.find("text_decoder", "onnx", "int4").extra["quantization"]
    return dict(h=m["hidden_size"], i=m["intermediate_size"], v=m["vocab_size"], layers=m["num_layers"],
                heads=m["num_heads"], kv=m["num_kv_heads"], hd=m["head_dim"], ctx=m["max_length"],
                block=q["block_size"], level=q.get("accuracy_level") or 0)


def _nbits_weights(name: str, k: int, n: int, bits: int, block: int, rng) -> list:
    """Random MatMulNBits codes and scales for a k x n weight: the B and scales initializers."""
    nb = -(-k // block)
    return [numpy_helper.from_array(rng.integers(0, 256, size=(n, nb, block * bits // 8), dtype=np.uint8), name + ".B"),
            numpy_helper.from_array(rng.random(n * nb, dtype=np.float32) * 0.01 + 1e-3, name + ".S")]


def _matmulnbits_graph(f: dict, layers: int, head_bits: int, rng) -> bytes:
    nodes, inits = [], []

    def mnb(name, x, k, n, bits=4):
        inits.extend(_nbits_weights(name, k, n, bits, f["block"], rng))
        nodes.append(helper.make_node("MatMulNBits", [x, name + ".B", name + ".S"], [name + ".y"], name=name,
                                      domain="com.microsoft", K=k, N=n, bits=bits, block_size=f["block"],
                                      accuracy_level=f["level"]))
        return name + ".y"

    x, h, kv = "x", f["h"], f["kv"] * f["hd"]
    side = []
    for L in range(layers):
        side.append(mnb(f"l{L}.qkv", x, h, f["heads"] * f["hd"] + 2 * kv))
        o = mnb(f"l{L}.o", x, f["heads"] * f["hd"], h)
        g = mnb(f"l{L}.gate", o, h, f["i"])
        side.append(mnb(f"l{L}.up", o, h, f["i"]))
        x = mnb(f"l{L}.down", g, f["i"], h)
    logits = mnb("lm_head", x, h, f["v"], head_bits)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in [logits, *side]]
    g = helper.make_graph(nodes, "matmulnbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h])],
                          outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def kernels(b: Bundle, threads: int) -> None:
    f, rng = _decoder_facts(b), np.random.default_rng(0)
    x = {"x": rng.standard_normal((1, f["h"])).astype(np.float32)}
    for layers, head_bits, what in ((f["layers"], 8, "a decode step's MatMulNBits, 8-bit LM head"),
                                    (f["layers"], 4, "a decode step's MatMulNBits, 4-bit LM head"),
                                    (0, 8, "the LM head alone, 8-bit"), (0, 4, "the LM head alone, 4-bit")):
        s = ort.InferenceSession(_matmulnbits_graph(f, layers, head_bits, rng), session_options(threads, True),
                                 providers=["CPUExecutionProvider"])
        ms = _median_ms(lambda: s.run(None, x))
        print(f"kernels: {what} (block {f['block']}, accuracy level {f['level']}): {ms:.2f} ms")


def blocks(b: Bundle, threads: int) -> None:
    f = _decoder_facts(b)
    x = {"x": np.random.default_rng(0).standard_normal((1, f["h"])).astype(np.float32)}

    def step_ms(block: int, level: int, steps: int) -> float:
        g = _matmulnbits_graph(dict(f, block=block, level=level), f["layers"], 8, np.random.default_rng(1))
        s = ort.InferenceSession(g, session_options(threads, True), providers=["CPUExecutionProvider"])
        return _median_ms(lambda: s.run(None, x), steps, 5)

    ms = {32: [], 128: []}
    for _ in range(2):
        for block in ms:
            ms[block].append(step_ms(block, 4, 32))
    slow = step_ms(f["block"], 1, 2)
    print("blocks: a decode step's MatMulNBits, level 4: " + "; ".join(
        f"block {k} {' / '.join(f'{v:.2f}' for v in vs)} ms" for k, vs in ms.items())
          + f" (two alternating rounds); block {f['block']} at level 1 (fp32 compute): {slow:.1f} ms")


def _one_node(op: str, ins: list, inits: list, domain: str = "", **attrs) -> bytes:
    node = helper.make_node(op, [i.name for i in ins] + [t.name for t in inits], ["y"], domain=domain, **attrs)
    g = helper.make_graph([node], op, ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def gemm(b: Bundle, threads: int, rows: int) -> None:
    """The prefill's GEMM through each kernel, at the bundle's shapes (rows x hidden -> intermediate)."""
    import torch

    f, rng = _decoder_facts(b), np.random.default_rng(0)
    k, n, blk = f["h"], f["i"], f["block"]
    x = rng.standard_normal((rows, k)).astype(np.float32)
    xin = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])]
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)

    def nbits(bits: int, level: int) -> bytes:
        return _one_node("MatMulNBits", xin, _nbits_weights("w", k, n, bits, blk, rng), "com.microsoft",
                         K=k, N=n, bits=bits, block_size=blk, accuracy_level=level)

    graphs = {
        "fp32 MatMul": _one_node("MatMul", xin, [numpy_helper.from_array(w, "W")]),
        f"MatMulNBits 4-bit, block {blk}, level 4 (int8 compute)": nbits(4, 4),
        f"MatMulNBits 4-bit, block {blk}, level 1 (fp32 compute)": nbits(4, 1),
        f"MatMulNBits 8-bit, block {blk}, level 4": nbits(8, 4),
        "int8 GEMM (DynamicQuantizeMatMul, int8 weights)": _one_node(
            "DynamicQuantizeMatMul", xin, [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "B"),
                                           numpy_helper.from_array(np.array(0.01, np.float32), "Bs"),
                                           numpy_helper.from_array(np.array(0, np.int8), "Bz")], "com.microsoft"),
    }
    flop = 2 * rows * k * n
    line = []
    for name, g in graphs.items():
        s = ort.InferenceSession(g, session_options(threads, False), providers=["CPUExecutionProvider"])
        ms = _median_ms(lambda: s.run(None, {"x": x}), 4, 7)
        line.append(f"{name} {flop / ms / 1e6:.0f}")
    torch.set_num_threads(threads)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    ms = _median_ms(lambda: tx @ tw, 4, 7)
    line.append(f"torch fp32 matmul {flop / ms / 1e6:.0f}")
    print(f"gemm ({rows}x{k} @ {k}x{n}, GFLOP/s): " + "; ".join(line))


def attention(b: Bundle, threads: int, positions: int) -> None:
    f = _decoder_facts(b)
    for cap in (f["ctx"], positions + 2):
        nh, kvh, hd = f["heads"], f["kv"], f["hd"]
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, w]) for n, w in
               (("q", nh * hd), ("k", kvh * hd), ("v", kvh * hd))]
        ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                helper.make_tensor_value_info("total", TensorProto.INT32, [])]
        nodes, outs = [], []
        for L in range(f["layers"]):
            ins += [helper.make_tensor_value_info(f"p{c}{L}", TensorProto.FLOAT, [1, kvh, cap, hd]) for c in "kv"]
            nodes.append(helper.make_node("GroupQueryAttention", ["q", "k", "v", f"pk{L}", f"pv{L}", "seqlens_k",
                                                                  "total"], [f"o{L}", f"k{L}", f"v{L}"],
                                          domain="com.microsoft", num_heads=nh, kv_num_heads=kvh))
            outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (f"o{L}", f"k{L}", f"v{L}")]
        m = helper.make_model(helper.make_graph(nodes, "gqa", ins, outs), opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        s = ort.InferenceSession(m.SerializeToString(), session_options(threads, True),
                                 providers=["CPUExecutionProvider"])
        io, rng = s.io_binding(), np.random.default_rng(0)
        for n, w in (("q", nh * hd), ("k", kvh * hd), ("v", kvh * hd)):
            io.bind_cpu_input(n, rng.standard_normal((1, 1, w)).astype(np.float32))
        io.bind_cpu_input("seqlens_k", np.array([positions - 1], np.int32))
        io.bind_cpu_input("total", np.array(positions, np.int32))
        for L in range(f["layers"]):
            for c in "kv":
                buf = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, kvh, cap, hd)).astype(np.float32))
                io.bind_ortvalue_input(f"p{c}{L}", buf)
                io.bind_ortvalue_output(f"{c}{L}", buf)
            io.bind_output(f"o{L}")
        ms = _median_ms(lambda: s.run_with_iobinding(io))
        kv_mb = 2 * f["layers"] * kvh * positions * hd * 4 / 1e6
        print(f"attention: {f['layers']} GroupQueryAttention at {positions} positions, KV buffer {cap}: {ms:.2f} ms "
              f"({kv_mb:.0f} MB of fp32 KV read)")


def _prompt(bundle: str, pipe):
    b = Bundle.open(bundle, verify="size")
    layout = bench_layout(b.section("model"), pipe.spec, pipe.tokenizer.bos_id, 32)
    size = pipe.preprocess_config.image_size
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    return b.section("model"), layout, px


def variants(bundle: str, threads: int, rounds: int = 5, steps: int = 64) -> None:
    pipe = load(bundle, backend="onnxruntime", precision="int4", threads=threads, verify="none", spin="off")
    s = pipe.session
    if s.decode_graph is None:
        print("variants: this bundle's int4 decoder has no decode graph; rebuild it with this version")
        return
    _, layout, px = _prompt(bundle, pipe)
    emb = s.encode_images(px)
    spun = ort.InferenceSession(s.decode_graph._model_path, session_options(threads, True),  # the same, spinning
                                providers=s.providers)
    s._bindings[id(spun)] = s._bind(spun)
    s._routed[id(spun)] = False
    graphs = {"routed graph": None, "decode graph": s.decode_graph, "decode graph, spinning": spun}
    res: dict = {k: [] for k in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            s.decode_graph = g
            s.reset()
            s.prefill(layout, emb)
            t0 = time.perf_counter()
            for k in range(steps):
                s.decode(7 + k % 100, layout.next_position + k)
            res[name].append(steps / (time.perf_counter() - t0))
    print("variants: " + ", ".join(f"{k} {statistics.median(v):.1f} tok/s" for k, v in res.items())
          + f" (medians of {rounds} interleaved rounds of {steps} steps)")


def versus(bundle: str, threads: int, rounds: int = 9, steps: int = 64) -> None:
    """onnxruntime int4 (as ``vlmexport.load`` runs it) against raw llama.cpp on the bundle's q4_0 text GGUF,
    interleaved: each round times both (decode steps after the same-length prompt), so a change of
    load on a shared machine hits both alike; the median of the per-round ratios is printed."""
    from vlmexport.runtimes.llamacpp_anchor import RawTextModel

    b = Bundle.open(bundle, verify="size")
    gguf = b.file(b.find("text_decoder", "gguf", "q4_0").file)
    pipe = load(bundle, backend="onnxruntime", precision="int4", threads=threads, verify="none")
    s = pipe.session
    _, layout, px = _prompt(bundle, pipe)
    emb = s.encode_images(px)
    raw_model = RawTextModel(gguf, len(layout) + steps + 1, threads)
    ort_tok, raw_tok = [], []
    for r in range(rounds + 1):  # the first round warms both up
        s.reset()
        s.prefill(layout, emb)
        t0 = time.perf_counter()
        for k in range(steps):
            s.decode(7 + k % 100, layout.next_position + k)
        a = steps / (time.perf_counter() - t0)
        raw = 1000.0 / raw_model.run(len(layout), steps)[1]
        if r:
            ort_tok.append(a)
            raw_tok.append(raw)
    raw_model.close()
    ratios = sorted(a / z for a, z in zip(ort_tok, raw_tok))
    print(f"versus: onnxruntime int4 {statistics.median(ort_tok):.1f} tok/s, raw llama.cpp q4_0 "
          f"{statistics.median(raw_tok):.1f} tok/s; per-round ratio median {statistics.median(ratios):.2f} "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}, {rounds} interleaved rounds of {steps} steps)")


def ttft_versus(bundle: str, threads: int, precisions=("fp32", "int4", "int4:off"), rounds: int = 9) -> None:
    """Time to first token (image encode + prefill + the first logits) of the torch reference and of
    onnxruntime at each precision, interleaved round by round in one process; medians of the
    per-round ratios to torch. ``P:MODE`` loads precision P with ``cpu_prefill=MODE`` (default
    "auto": the int8-GEMM prefill where this CPU lacks VNNI and the bundle's gate scored it)."""
    pipes = {"torch": load(bundle, backend="torch", threads=threads, verify="none")}
    for p in precisions:
        name, _, mode = p.partition(":")
        pipes[p] = load(bundle, backend="onnxruntime", precision=name, threads=threads, verify="none",
                        cpu_prefill=mode or "auto")
        if getattr(pipes[p].session, "prefill_path", None):
            print(f"ttft-versus: onnxruntime {p} runs its prompt through the int8-GEMM prefill copy")
    _, layout, px = _prompt(bundle, pipes["torch"])

    def first_token(pipe) -> float:
        t0 = time.perf_counter()
        pipe.session.reset()
        int(np.argmax(pipe.session.prefill(layout, pipe.session.encode_images(px))))
        return (time.perf_counter() - t0) * 1000

    ms: dict = {k: [] for k in pipes}
    for r in range(rounds + 1):  # the first round warms every pipeline up
        for k, pipe in pipes.items():
            t = first_token(pipe)
            if r:
                ms[k].append(t)
    line = [f"torch {statistics.median(ms['torch']):.0f} ms"]
    for p in precisions:
        ratios = sorted(a / t for a, t in zip(ms[p], ms["torch"]))
        line.append(f"onnxruntime {p} {statistics.median(ms[p]):.0f} ms, per-round ratio median "
                    f"{statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    print(f"ttft-versus ({rounds} interleaved rounds): " + "; ".join(line))


def ttft(bundle: str, precision: str, threads: int) -> None:
    name, _, mode = precision.partition(":")  # P:MODE as in ttft_versus
    pipe = load(bundle, backend="onnxruntime", precision=name, threads=threads, verify="none",
                cpu_prefill=mode or "auto")
    s = pipe.session
    model, layout, px = _prompt(bundle, pipe)
    feats = s.vision_encoder.run(["image_features"], {"pixel_values": px})[0]
    vis = _median_ms(lambda: s.vision_encoder.run(["image_features"], {"pixel_values": px}), 1, 5)
    con = _median_ms(lambda: s.connector.run(["image_embeds"], {"image_features": feats}), 1, 5)
    emb = s.encode_images(px)

    def prefill():
        s.reset()
        s.prefill(layout, emb)

    pf = _median_ms(prefill, 1, 5)
    gf = prefill_flops(model, len(layout)) / pf / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads, s.spin.value != "off", profile=True)
        so.profile_file_prefix = str(Path(tmp) / "prefill")
        d = ort.InferenceSession(s.decoder._model_path, so, providers=s.providers)
        s._bindings[id(d)] = s._bind(d)
        s._routed[id(d)] = True
        s.decoder = d
        for _ in range(4):
            prefill()
        events = json.loads(Path(d.end_profiling()).read_text())
    layer, ops = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            m = re.match(r"layers\.(\d+)\.", e["name"])
            layer[int(m[1]) if m else -1] += e["dur"] / 4000
            ops[e["args"]["op_name"]] += e["dur"] / 4000
    per = [v for k, v in layer.items() if k >= 0]
    top = ", ".join(f"{op} {ms:.1f}" for op, ms in ops.most_common(4))
    print(f"ttft {precision}: vision encoder {vis:.1f} ms, connector {con:.1f} ms, prefill {pf:.1f} ms "
          f"({len(layout)} positions, {gf:.0f} GFLOP/s); per layer median {statistics.median(per):.1f} ms "
          f"(min {min(per):.1f}, max {max(per):.1f}), outside layers {layer[-1]:.1f} ms; ops (ms): {top}")


def last_layer(bundle: str, precision: str, threads: int, rounds: int = 15) -> None:
    from vlmexport.core.names import DECODER_ALL_ROWS
    from vlmexport.runtimes.onnxruntime_backend import CROSS_MEDIA, CROSS_MEMORY

    pipe = load(bundle, backend="onnxruntime", precision=precision, threads=threads, verify="none")
    s = pipe.session
    model, layout, px = _prompt(bundle, pipe)
    path, last = s.decoder._model_path, model["num_layers"] - 1
    if DECODER_ALL_ROWS not in {i.name for i in s.decoder.get_overridable_initializers()}:
        print(f"last-layer {precision}: this bundle's decoder predates {DECODER_ALL_ROWS}; rebuild it")
        return
    n, dtype = len(layout), np.float16 if precision == "fp16" else np.float32
    empty = np.zeros((1, model["num_kv_heads"], 0, model["head_dim"]), dtype)
    feeds = {"inputs_embeds": (np.random.default_rng(0).standard_normal((1, n, model["hidden_size"])) * 0.02
                               ).astype(dtype),
             "attention_mask": np.ones((1, n), np.int64), "position_ids": layout.position_ids[None],
             **{f"past_key_values.{i}.{k}": empty for i in range(model["num_layers"]) for k in ("key", "value")}}
    inputs = {i.name: i for i in s.decoder.get_inputs()}
    if "token_type" in inputs:
        feeds["token_type"] = layout.token_type[None]
    if CROSS_MEMORY in inputs:  # a cross-attending decoder (flamingo): the image is its memory, not in its sequence
        width = inputs[CROSS_MEMORY].shape[-1]
        feeds[CROSS_MEMORY] = np.asarray(s.encode_images(px), dtype).reshape(1, -1, width)
        feeds[CROSS_MEDIA] = np.asarray(layout.media, np.int64)[None]
    del pipe, s
    with tempfile.TemporaryDirectory() as tmp:  # the prefill profiled, so the last layer's own time shows
        so = session_options(threads, False, profile=True)
        so.profile_file_prefix = str(Path(tmp) / "last")
        d = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        order = [f for r in range(rounds) for f in ((0, 1) if r % 2 == 0 else (1, 0))]
        logits = {f: d.run(["logits"], {**feeds, DECODER_ALL_ROWS: np.array(f, np.int64)})[0] for f in (1, 0)}
        for f in order:
            d.run(["logits"], {**feeds, DECODER_ALL_ROWS: np.array(f, np.int64)})
        events = json.loads(Path(d.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][2:]  # after the two logits runs
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and e["name"].startswith(f"layers.{last}.")]
    run_ms, layer_ms = {0: [], 1: []}, {0: [], 1: []}
    for r, f in zip(runs, order):
        run_ms[f].append(r["dur"] / 1e3)
        layer_ms[f].append(sum(e["dur"] for e in nodes if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]) / 1e3)
    med = {f: (statistics.median(run_ms[f]), statistics.median(layer_ms[f])) for f in (0, 1)}
    ratio = statistics.median(a / b for a, b in zip(run_ms[0], run_ms[1]))
    print(f"last-layer {precision} ({rounds} alternating rounds, {n} positions, profiled): last position only "
          f"{med[0][0]:.0f} ms (layer {last} {med[0][1]:.1f} ms), every position {med[1][0]:.0f} ms (layer {last} "
          f"{med[1][1]:.1f} ms); per-round ratio median {ratio:.3f}; logits max difference "
          f"{float(np.abs(logits[0] - logits[1]).max()):.2g}")



def _op_table(events: list, skip: int = 1) -> tuple[list[tuple[str, float]], int]:
    """``(op type, ms per run)`` from an onnxruntime profile, largest first, leaving out the first
    ``skip`` runs (warm-up: arena growth, KV buffers); and the number of runs counted."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip:]
    ops = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in runs):
            ops[e["args"]["op_name"]] += e["dur"] / 1000 / len(runs)
    return ops.most_common(), len(runs)


def ops(bundle: str, precision: str, threads: int, runs: int = 5) -> None:
    from vlmexport.core.names import Spin
    from vlmexport.runtimes.onnxruntime_backend import QDQ_DISABLED_OPTIMIZERS

    name, _, mode = precision.partition(":")
    pipe = load(bundle, backend="onnxruntime", precision=name, threads=threads, verify="none",
                cpu_prefill=mode or "auto")
    s = pipe.session
    _, layout, px = _prompt(bundle, pipe)
    emb = s.encode_images(px)

    def profiled(path: str, decoder: bool, tmp: str, prefix: str) -> ort.InferenceSession:
        """A session as the runtime opens it (OrtModelSession._session), profiling on."""
        so = session_options(threads, s.spin is Spin.ALL or (decoder and s.spin is Spin.DECODE), profile=True)
        so.profile_file_prefix = str(Path(tmp) / prefix)
        qdq = not decoder and ".int8." in Path(path).name
        return ort.InferenceSession(path, so, providers=s.providers,
                                    disabled_optimizers=list(QDQ_DISABLED_OPTIMIZERS) if qdq else None)

    with tempfile.TemporaryDirectory() as tmp:
        d = profiled(s.decoder._model_path, True, tmp, "prefill")
        s._bindings[id(d)] = s._bind(d)
        s._routed[id(d)] = True
        s.decoder = d
        for _ in range(runs + 1):
            s.reset()
            s.prefill(layout, emb)
        tables = {"prefill": _op_table(json.loads(Path(d.end_profiling()).read_text()))}
        v = profiled(s.vision_encoder._model_path, False, tmp, "vision")
        feed = {"pixel_values": px.astype(np.float16 if "float16" in v.get_inputs()[0].type else np.float32)}
        for _ in range(runs + 1):
            v.run(None, feed)
        tables["vision encoder"] = _op_table(json.loads(Path(v.end_profiling()).read_text()))
    for part, (table, n) in tables.items():
        total = sum(ms for _, ms in table)
        cells = ", ".join(f"{op} {ms:.1f} ({ms / total:.0%})" for op, ms in table if ms >= 0.05)
        print(f"ops {precision} {part} (profiled, {n} runs after one warm-up, ms a run): total {total:.1f}; {cells}")


def _alternating(fns: dict, rounds: int = 9, steps: int = 10) -> dict:
    """Median ms of each callable over ``rounds`` rounds that alternate their order."""
    for fn in fns.values():
        fn()
    ms = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            ms[k].append((time.perf_counter() - t0) / steps * 1000)
    return ms


def _ratio_text(ms: dict, a: str, b: str) -> str:
    ratios = sorted(x / y for x, y in zip(ms[a], ms[b]))
    return (f"{a} {statistics.median(ms[a]):.2f} ms, {b} {statistics.median(ms[b]):.2f} ms, per-round ratio "
            f"median {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})")


def alternatives(b: Bundle, threads: int, rows: int, positions: int) -> None:
    f, rng = _decoder_facts(b), np.random.default_rng(0)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    vi = helper.make_tensor_value_info

    def session(nodes, ins, outs, inits=(), opset=opsets) -> ort.InferenceSession:
        m = helper.make_model(helper.make_graph(nodes, "g", ins, outs, list(inits)), opset_imports=opset)
        return ort.InferenceSession(m.SerializeToString(), session_options(threads, False),
                                    providers=["CPUExecutionProvider"])

    # gate|up: one MatMul of N = 2 * intermediate and a Split, against the graph's two MatMuls
    h, i = f["h"], f["i"]
    wg, wu = ((rng.standard_normal((h, i)) * 0.05).astype(np.float32) for _ in range(2))
    tail = [helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["a"]),
            helper.make_node("Mul", ["a", "u"], ["y"])]
    x_in, y_out = [vi("x", TensorProto.FLOAT, [rows, h])], [vi("y", TensorProto.FLOAT, [rows, i])]
    separate = session([helper.make_node("MatMul", ["x", "wg"], ["g"]), helper.make_node("MatMul", ["x", "wu"], ["u"]),
                        *tail], x_in, y_out, [numpy_helper.from_array(wg, "wg"), numpy_helper.from_array(wu, "wu")])
    fused = session([helper.make_node("MatMul", ["x", "w"], ["gu"]),
                     helper.make_node("Split", ["gu"], ["g", "u"], axis=-1, num_outputs=2), *tail], x_in, y_out,
                    [numpy_helper.from_array(np.concatenate([wg, wu], 1), "w")])
    x = rng.standard_normal((rows, h)).astype(np.float32)
    diff = float(np.abs(fused.run(None, {"x": x})[0] - separate.run(None, {"x": x})[0]).max())
    ms = _alternating({"fused": lambda: fused.run(None, {"x": x}), "separate": lambda: separate.run(None, {"x": x})})
    print(f"alternatives, gate|up ({rows}x{h} @ {h}x{i} twice, fp32): {_ratio_text(ms, 'fused', 'separate')}; "
          f"max difference {diff:.2g}")

    # attention: one GroupQueryAttention (KV buffer bound in place) against opset-23 Attention, causal
    nh, kvh, hd = f["heads"], f["kv"], f["hd"]
    cap = -(-positions // KV_CHUNK) * KV_CHUNK  # the runtime's KV buffer at this length
    qkv = {n: rng.standard_normal((1, positions, w)).astype(np.float32)
           for n, w in (("q", nh * hd), ("k", kvh * hd), ("v", kvh * hd))}
    ins = [vi(n, TensorProto.FLOAT, list(a.shape)) for n, a in qkv.items()]
    buf = [vi(n, TensorProto.FLOAT, [1, kvh, cap, hd]) for n in ("pk", "pv")]
    gqa = session([helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"],
                                    ["y", "ok", "ov"], domain="com.microsoft", num_heads=nh, kv_num_heads=kvh)],
                  ins + buf + [vi("seqlens_k", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [])],
                  [vi("y", TensorProto.FLOAT, None), vi("ok", TensorProto.FLOAT, None), vi("ov", TensorProto.FLOAT, None)])
    io = gqa.io_binding()
    for n, a in qkv.items():
        io.bind_cpu_input(n, a)
    io.bind_cpu_input("seqlens_k", np.array([positions - 1], np.int32))
    io.bind_cpu_input("total", np.array(positions, np.int32))
    for n, o in (("pk", "ok"), ("pv", "ov")):
        kv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kvh, cap, hd), np.float32))
        io.bind_ortvalue_input(n, kv)
        io.bind_ortvalue_output(o, kv)
    io.bind_output("y")
    gqa.run_with_iobinding(io)
    y_gqa = dict(zip(["ok", "ov", "y"], io.get_outputs()))["y"].numpy()  # outputs in the order bound
    try:
        att = session([helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1, q_num_heads=nh,
                                        kv_num_heads=kvh)], ins, [vi("y", TensorProto.FLOAT, None)],
                      opset=[helper.make_opsetid("", 23)])
    except Exception as exc:  # an onnxruntime without opset 23's Attention on the CPU
        print(f"alternatives, attention: opset-23 Attention unavailable ({str(exc).splitlines()[0][:100]})")
        return
    diff = float(np.abs(att.run(None, qkv)[0] - y_gqa).max())
    ms = _alternating({"Attention": lambda: att.run(None, qkv), "GroupQueryAttention": lambda: gqa.run_with_iobinding(io)})
    print(f"alternatives, attention ({positions} positions, {nh} heads, KV buffer {cap}, one layer): "
          f"{_ratio_text(ms, 'Attention', 'GroupQueryAttention')}; max difference {diff:.2g}; Attention writes no "
          "KV cache")


def spin(bundle: str, precision: str, threads: int, rounds: int = 15) -> None:
    modes = ("off", "decode", "all")
    pipes = {k: load(bundle, backend="onnxruntime", precision=precision, threads=threads, verify="none", spin=k)
             for k in modes}
    _, layout, px = _prompt(bundle, pipes["decode"])
    parts: dict = {k: {"encode": [], "prefill": []} for k in modes}
    for r in range(rounds + 1):  # the first round warms every pipeline up
        for k in (modes if r % 2 == 0 else modes[::-1]):
            s = pipes[k].session
            t0 = time.perf_counter()
            emb = s.encode_images(px)
            t1 = time.perf_counter()
            s.reset()
            int(np.argmax(s.prefill(layout, emb)))
            if r:
                parts[k]["encode"].append((t1 - t0) * 1000)
                parts[k]["prefill"].append((time.perf_counter() - t1) * 1000)
    enc = {k: parts[k]["encode"] for k in ("all", "decode")}
    pre = {k: parts[k]["prefill"] for k in ("decode", "off")}
    print(f"spin {precision} ({rounds} interleaved rounds): image encode, spin {_ratio_text(enc, 'all', 'decode')}; "
          f"prefill, spin {_ratio_text(pre, 'decode', 'off')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="a bundle built with --precision fp32,int8,int4 (bench-s: docs/results.md)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="kernels,attention,blocks,gemm,variants,versus,ttft-versus,ttft,last-layer,"
                                      "ops,alternatives,spin")
    ap.add_argument("--ttft-precisions", default="fp32,int4",
                    help="ttft, last-layer, ops and spin; ttft and ops take P:MODE (cpu_prefill MODE: auto, int8, off)")
    ap.add_argument("--versus-precisions", default="fp32,int4,int4:off", help="ttft-versus: P or P:MODE")
    a = ap.parse_args()
    what = set(a.only.split(","))
    b = Bundle.open(a.bundle, verify="size")
    if "kernels" in what:
        kernels(b, a.threads)
    if "attention" in what:
        pipe = load(a.bundle, backend="onnxruntime", precision="int4", verify="none")
        n = len(_prompt(a.bundle, pipe)[1]) + 32  # the prompt and 32 decoded tokens
        del pipe
        attention(b, a.threads, n)
    if "blocks" in what:
        blocks(b, a.threads)
    if "gemm" in what:
        gemm(b, a.threads, b.section("model")["image_tokens"])
    if "variants" in what:
        variants(a.bundle, a.threads)
    if "versus" in what:
        versus(a.bundle, a.threads)
    if "ttft-versus" in what:
        ttft_versus(a.bundle, a.threads, tuple(a.versus_precisions.split(",")))
    if "ttft" in what:
        for p in a.ttft_precisions.split(","):
            ttft(a.bundle, p, a.threads)
    if "last-layer" in what:
        for p in a.ttft_precisions.split(","):
            last_layer(a.bundle, p, a.threads)
    if "ops" in what:
        for p in a.ttft_precisions.split(","):
            ops(a.bundle, p, a.threads)
    if "alternatives" in what:
        pipe = load(a.bundle, backend="onnxruntime", precision="fp32", verify="none")
        n = len(_prompt(a.bundle, pipe)[1])
        del pipe
        alternatives(b, a.threads, b.section("model")["image_tokens"], n)
    if "spin" in what:
        for p in a.ttft_precisions.split(","):
            spin(a.bundle, p.partition(":")[0], a.threads)


if __name__ == "__main__":
    main()
