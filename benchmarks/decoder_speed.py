"""Text-decoder speed: the onnxruntime backend against the torch reference, same run, same machine.

Shape "bench-s": hidden 1024, 16 layers, 16 heads (head 64), FFN 2816, vocab 32000, with
visual experts (cogvlm), seeded random weights. Measures, with medians over repeats:

- decode tokens/s (one token per step after a short prompt),
- prefill ms of 32 text tokens and of (1 image's tokens + 32 text tokens),
- the machine's memory read bandwidth (a 1 GiB float32 array read by numpy sum and by
  BLAS dot, one thread and one thread per core, best of 5; the largest is the reference),
- decode efficiency = bytes of weights read per token (language expert, norms, lm_head,
  one embedding row) x tokens/s / bandwidth.

Backends run interleaved (repeat 1 of each, repeat 2 of each, ...) so a change of load
hits all of them alike.

    python benchmarks/decoder_speed.py --workdir /tmp/bench-s           # fp32, 2 threads
    python benchmarks/decoder_speed.py --precision fp16 --skip-torch
    python benchmarks/decoder_speed.py --variants --skip-torch          # spinning x decode graph
    python benchmarks/decoder_speed.py --profile /tmp/prof              # onnxruntime profiles
    python benchmarks/decoder_speed.py --export-rss                     # streaming export memory

Not a test: numbers depend on the machine and on what else runs on it (the script
prints the load average before and after; check ``top`` too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH_S = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
               num_attention_heads=16, max_position_embeddings=2048)


def build_model(image_size: int, patch: int, seed: int = 0):
    import torch

    from vlmexport.models import get_architecture, seeded_init
    from vlmexport.models.base import VisionConfig

    A = get_architecture("cogvlm")
    vision = VisionConfig(image_size=image_size, patch_size=patch, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_heads=4)
    with torch.no_grad():
        return seeded_init(A(A.tiny_config(**BENCH_S, vision_config=vision)), seed).eval()


def bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Best GB/s reading a ``gib`` GiB float32 array with ``threads`` threads (numpy releases the GIL):
    ``sum`` (numpy's pairwise sum) and ``dot`` (BLAS sdot against a ones vector)."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    ones = np.ones_like(a)
    parts = [(p, ones[: p.size]) for p in np.array_split(a, threads)]
    kernels = {"sum": lambda p, o: p.sum(), "dot": lambda p, o: np.dot(p, o)}
    best = {}
    for name, f in kernels.items():
        best[name] = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            ts = [threading.Thread(target=f, args=pa) for pa in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            # dot also streams the ones vector: it reads twice the bytes
            best[name] = max(best[name], a.nbytes * (2 if name == "dot" else 1) / (time.perf_counter() - t0) / 1e9)
    return best


def decode_bytes(spec, itemsize: int) -> int:
    """Weight bytes one decode step reads: the language expert of every layer, norms, lm_head, an embedding row."""
    H, F, q, kv = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = H * (q + 2 * kv) + q * H + 3 * H * F + 2 * H
    return itemsize * (spec.num_layers * per_layer + H + spec.vocab_size * H + H)


def time_once(session, layout_text, layout_image, image_embeds, steps: int) -> dict:
    """One repeat: prefill ms (text only; image + text), then decode tok/s over ``steps`` steps."""
    session.reset()
    t0 = time.perf_counter()
    session.prefill(layout_text, None)
    text_ms = (time.perf_counter() - t0) * 1e3
    session.reset()
    t0 = time.perf_counter()
    logits = session.prefill(layout_image, image_embeds)
    image_ms = (time.perf_counter() - t0) * 1e3
    pos, tok = layout_image.next_position, int(np.argmax(logits))
    session.decode(tok, pos)  # warm the one-token path
    t0 = time.perf_counter()
    for i in range(steps):
        session.decode(tok, pos + 1 + i)
    return dict(decode_tok_s=steps / (time.perf_counter() - t0), prefill_text_ms=text_ms, prefill_image_ms=image_ms)


def summarize(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["all"] = {k: [round(r[k], 2) for r in runs] for k in runs[0]}
    return out


_EXPORT_RSS = """
import sys, time
from pathlib import Path
from vlmexport.exporter.onnx_decoder import export_text_decoder
from vlmexport.models.checkpoint import SafetensorsCheckpoint, read_config
arch, config, _ = read_config(sys.argv[1])
spec = arch.part_specs(config).decoder
ckpt = SafetensorsCheckpoint(sys.argv[1])
largest = max(ckpt.shape(n)[0] * (ckpt.shape(n)[1] if len(ckpt.shape(n)) > 1 else 1) * 4 for n in ckpt.keys())
def hwm():  # peak RSS of this address space (ru_maxrss would include the parent's peak at fork)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
base = hwm()
t0 = time.perf_counter()
g = export_text_decoder(ckpt, spec, Path(sys.argv[2]) / "text_decoder.onnx")
peak = hwm()
print(f"{base} {peak} {largest} {g.data_bytes} {time.perf_counter() - t0:.1f}")
"""


def export_rss(model, work: Path) -> None:
    """Export from a saved checkpoint in a fresh process; print its peak RSS against the checkpoint size."""
    import subprocess

    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.models.checkpoint import save_pretrained

    ckpt = work / "checkpoint"
    if not (ckpt / "model.safetensors").is_file():
        save_pretrained(model, ckpt, None, PreprocessConfig(image_size=model.config.vision_config.image_size))
    out = work / "from_checkpoint"
    out.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-c", _EXPORT_RSS, str(ckpt), str(out)], capture_output=True, text=True,
                       check=True)
    base, peak, largest, data, secs = r.stdout.split()
    size = (ckpt / "model.safetensors").stat().st_size
    print(f"export from checkpoint ({size / 1e9:.2f} GB safetensors, {int(data) / 1e9:.2f} GB written in {secs}s): "
          f"peak RSS {int(peak) / 1e9:.2f} GB = {int(base) / 1e9:.2f} GB after imports + "
          f"{(int(peak) - int(base)) / 1e6:.0f} MB; largest tensor {int(largest) / 1e6:.0f} MB", flush=True)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224, help="with --patch: image tokens = (size/patch)^2 + 2")
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--workdir", default=None, help="write the export here (default: a temporary directory)")
    ap.add_argument("--reuse-export", action="store_true", help="reuse an export already in --workdir")
    ap.add_argument("--decode-graph", action="store_true", help="decode with the routing-free decode graph")
    ap.add_argument("--variants", action="store_true", help="A/B spinning and the decode graph (ORT only)")
    ap.add_argument("--spinning", action="store_true", help="let onnxruntime's pool threads spin (default off)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--profile", default=None, help="write onnxruntime profiles (json) into this directory")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--export-rss", action="store_true",
                    help="also export from a saved checkpoint in a fresh process and report its peak memory")
    args = ap.parse_args(argv)

    import torch

    from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
    from vlmexport.exporter.onnx_decoder import export_text_decoder, export_token_embedding
    from vlmexport.runtimes.torch_session import TorchSession
    from vlmexport.runtimes.onnxruntime_backend import OrtModelSession
    from vlmexport.runtimes.spec import DecoderShape as DecoderFacts

    torch.set_num_threads(args.threads)
    print(f"load average before: {load_average()}  (cores: {os.cpu_count()})", flush=True)
    t0 = time.perf_counter()
    model = build_model(args.image_size, args.patch)
    spec = type(model).part_specs(model.config).decoder
    print(f"built bench-s in {time.perf_counter() - t0:.1f}s: {model.num_parameters() / 1e6:.0f}M parameters", flush=True)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="decoder_speed_"))
    onnx_path = work / f"text_decoder.{args.precision}.onnx"
    emb_path = work / f"token_embedding.{args.precision}.safetensors"
    if not args.reuse_export or not onnx_path.is_file():
        state = model.state_dict()

        class Tensors:
            get = staticmethod(state.__getitem__)
            keys = staticmethod(state.keys)

        t0 = time.perf_counter()
        export_text_decoder(Tensors(), spec, onnx_path, precision=args.precision, max_length=args.max_length,
                            decode_model=args.variants or args.decode_graph)
        export_token_embedding(Tensors(), spec, emb_path, precision=args.precision)
        del state
        print(f"exported in {time.perf_counter() - t0:.1f}s to {work}", flush=True)
    facts = DecoderFacts(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.vocab_size,
                         args.max_length)

    if args.export_rss:
        export_rss(model, work)

    rng = np.random.default_rng(0)
    text = [TextPiece(tuple(int(t) for t in rng.integers(3, spec.vocab_size, args.text_tokens)))]
    n_img = model.image_tokens()
    layout_text = build_layout(text)
    layout_image = build_layout([TextPiece((1,)), ImagePiece(n_img)] + text)
    image_embeds = (rng.standard_normal((1, n_img, spec.hidden_size)) * 0.02).astype(np.float32)

    sessions = {}
    if not args.skip_torch:
        sessions["torch"] = TorchSession(model, max_length=args.max_length)
    else:
        del model
    variants = [("ort", args.spinning, args.decode_graph)]
    if args.variants:  # A/B the runtime settings in the same run
        variants = [("ort spin", True, False), ("ort nospin", False, False), ("ort spin+dec", True, True),
                    ("ort nospin+dec", False, True)]
    for name, spin, dec in variants:
        t0 = time.perf_counter()
        sessions[name] = OrtModelSession(
            onnx_path, emb_path, facts, decode_path=onnx_path.with_name(onnx_path.stem + ".decode.onnx") if dec else None,
            providers=["CPUExecutionProvider"], intra_op_num_threads=args.threads, max_length=args.max_length,
            allow_spinning=spin, profile=bool(args.profile))
        print(f"{name}: session ready in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"max RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB", flush=True)
    runs: dict[str, list] = {k: [] for k in sessions}
    for r in range(args.repeats):  # interleaved, so load changes hit every backend alike
        for name, sess in sessions.items():
            runs[name].append(time_once(sess, layout_text, layout_image, image_embeds, args.steps))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]['decode_tok_s']:.1f} tok/s" for k, v in runs.items()),
              flush=True)
    results = {k: summarize(v) for k, v in runs.items()}
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        for name, sess in sessions.items():
            if hasattr(sess, "end_profiling"):
                for p in sess.end_profiling():
                    os.replace(p, Path(args.profile) / f"{name.replace(' ', '_')}_{Path(p).name}")
    sessions.clear()

    bws = {f"{k} x{n}": v for n in sorted({1, args.threads}) for k, v in bandwidth(n).items()}
    bw = max(bws.values())
    nbytes = decode_bytes(spec, 2 if args.precision == "fp16" else 4)
    print(f"load average after: {load_average()}")
    print("\nmemory read bandwidth (GB/s, best of 5, 1 GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in bws.items())
          + f"; reference = max = {bw:.1f}")
    print(f"weights read per decode token: {nbytes / 1e6:.0f} MB ({args.precision})")
    print(f"prompt: {layout_image.input_ids.size} positions ({n_img} image + {args.text_tokens + 1} text)\n")
    hdr = f"{'backend':<12}{'decode tok/s':>14}{'GB/s':>8}{'% of bw':>9}{'prefill 32 ms':>15}{'prefill img+32 ms':>19}"
    print(hdr + "\n" + "-" * len(hdr))
    for name, r in results.items():
        gbs = nbytes * r["decode_tok_s"] / 1e9
        print(f"{name:<12}{r['decode_tok_s']:>14.1f}{gbs:>8.1f}{100 * gbs / bw:>8.0f}%"
              f"{r['prefill_text_ms']:>15.1f}{r['prefill_image_ms']:>19.1f}")
    ort_name = next(k for k in results if k.startswith("ort"))
    if "torch" in results:
        t, o = results["torch"], results[ort_name]
        print(f"\nort / torch: decode {o['decode_tok_s'] / t['decode_tok_s']:.2f}x (target >= 2.0), "
              f"prefill img+32 {o['prefill_image_ms'] / t['prefill_image_ms']:.2f}x (target <= 0.6), "
              f"prefill 32 {o['prefill_text_ms'] / t['prefill_text_ms']:.2f}x")
    gbs = nbytes * results[ort_name]["decode_tok_s"] / 1e9
    print(f"{ort_name} decode efficiency: {100 * gbs / bw:.0f}% of measured bandwidth (target >= 75)")
    if args.precision == "fp16":
        # the CPU EP has no fp16 Gemm: onnxruntime folds Cast(fp16 -> fp32) into the weights at load
        gbs32 = decode_bytes(spec, 4) * results[ort_name]["decode_tok_s"] / 1e9
        print(f"note: on the CPU EP the fp16 weights are upcast to fp32 at session creation, so a decode step "
              f"reads fp32 bytes: {gbs32:.1f} GB/s = {100 * gbs32 / bw:.0f}% of bandwidth")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), bandwidth_gb_s=bws, decode_bytes=nbytes,
                                                   load_average=load_average(), results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
