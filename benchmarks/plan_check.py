"""Check `vlmexport plan` against reality: predicted peak memory vs measured peak RSS, per backend x precision.

Each artifact set of each bundle runs in a fresh process: import the backend and read the
tokenizer (RSS then = the runtime's base, before any weights), load the bundle, answer the
longest prompt the planner assumes (as many images as the context holds, text up to the
context), then read the peak RSS (VmHWM). Prints a markdown table and the measured overhead
terms (base MB per backend, resident bytes per byte of weight files) that vlmexport/plan.py's
MEASURED table holds.

    python benchmarks/plan_check.py /tmp/demo-bundle /tmp/mid-bundle
    python benchmarks/plan_check.py demo-bundle --make /tmp/plan   # + two random models of other shapes

Not a test: the figures are for this machine (CPU, RSS), see docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


REQUESTS = 3  # answers per measurement; the peak is taken after the last


def worker(bundle: str, backend: str, precision: str, context: int, images: int) -> None:
    """One measurement (in its own process); prints a JSON line."""
    import numpy as np

    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import llama_cpp.llama_cpp  # noqa: F401
        import llama_cpp.mtmd_cpp  # noqa: F401
    import vlmexport
    from vlmexport.bundle import Bundle
    from vlmexport.core.tokenizer import Tokenizer

    b = Bundle.open(bundle, verify="none")
    Tokenizer(b.file(b.section("tokenizer")["file"])).encode("warm up")
    base = _status("VmRSS")
    pipe = vlmexport.load(bundle, backend=backend, precision=precision, verify="none", threads=2)
    loaded = _status("VmRSS")
    size = pipe.preprocess_config.image_size
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)]
    from vlmexport.core.prompt import PromptError, Turn

    n = max(1, context - images * pipe.spec.image_tokens)
    while True:  # the longest prompt that leaves room for 4 new tokens
        prompt = "<image>" * images + " ".join(["red"] * n)
        try:
            length = len(pipe.prepare([Turn(prompt, images=images)], pics)[0])
        except PromptError:
            length = context + 1
        if length <= context - 5 or n == 1:
            break
        n = max(1, n - max(1, (length - context + 5) // 2, n // 16))
    # the steady state, not the first request: a runtime may keep what one request grew (onnxruntime's
    # arenas did, 334 -> 515 MB above the weights on bench-s from the first to the second request)
    first = None
    for _ in range(REQUESTS):
        pipe.generate(prompt, pics, max_new_tokens=4)
        first = first or _status("VmHWM")
    print(json.dumps({"base_mb": base, "loaded_mb": loaded, "first_peak_mb": first, "peak_mb": _status("VmHWM")}))


def measure(bundle: Path, backend: str, precision: str, context: int, images: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, __file__, "--worker", str(bundle), backend, precision, str(context),
                        str(images)], capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


SHAPES = {  # random models of other sizes than the demo (the demo's tokenizer and a 32-pixel ViT)
    "mid": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                max_position_embeddings=1024),
    "wide": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                 max_position_embeddings=2048),
}


def make_mid(workdir: Path, name: str = "mid") -> Path:
    """A random model of shape SHAPES[name] with the demo's tokenizer, built into a bundle."""
    import torch

    from vlmexport.assets import demo_model_dir
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.models import get_architecture, seeded_init
    from vlmexport.models.checkpoint import save_pretrained

    A = get_architecture("cogvlm")
    cfg = A.tiny_config(vocab_size=1024, **SHAPES[name])
    torch.manual_seed(0)
    model = seeded_init(A(cfg), 0).eval()
    demo = demo_model_dir()
    src = save_pretrained(model, workdir / f"{name}-model", demo / "tokenizer.model",
                          PreprocessConfig(image_size=cfg.vision_config.image_size))
    out = workdir / f"{name}-bundle"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-m", "vlmexport.cli", "build", str(src), "--out", str(out), "--format",
                    "onnx,gguf", "--precision", "fp32,fp16,q8_0", "--no-validate", "--no-reference",
                    "--imatrix-pairs", "0"], check=True, env=env)
    return out


def fit_activations(backend: str, rows: list[dict]) -> dict:
    """What the longest prompt adds above the loaded weights and KV (peak - loaded, steady state)
    against the planner's two formulas (plan.activation_terms). onnxruntime: fixed MB + a x decoder
    + b x vision, least squares; llama.cpp (one reused buffer, the larger term): one scale
    through the origin."""
    import numpy as np

    y = np.array([r["peak_mb"] - r["loaded_mb"] for r in rows])
    dec = np.array([r["decoder_formula_mb"] for r in rows])
    vis = np.array([r["vision_formula_mb"] for r in rows])
    if backend == "onnxruntime":
        (fixed, a, b), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(dec), dec, vis]), y, rcond=None)
        return {"fixed_mb": round(float(fixed), 1), "decoder": round(float(a), 2), "vision": round(float(b), 2)}
    x = np.maximum(dec, vis)
    scale = round(float(x @ y / (x @ x)), 2)
    return {"decoder": scale, "vision": scale}


def fit(rows: list[dict]) -> dict:
    """base (median), fixed (intercept of the fp32 loads over two model sizes) and per-byte factors per precision
    (least squares):
    loaded RSS = base + fixed + per_byte x weight files + KV cache."""
    import statistics

    out = {}
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        base = statistics.median(r["base_mb"] for r in mine)
        pts = sorted((r["files_mb"], r["loaded_mb"] - r["base_mb"] - r["kv_mb"]) for r in mine
                     if r["precision"] in ("fp32", "f32"))
        fixed = 0.0
        if len({x for x, _ in pts}) >= 2:
            (x0, y0), (x1, y1) = pts[0], pts[-1]
            fixed = max(0.0, y0 - (y1 - y0) / (x1 - x0) * x0)
        per_byte = {}
        for p in sorted({r["precision"] for r in mine}):  # least squares through the origin: big models weigh most
            xy = [(r["files_mb"], r["loaded_mb"] - r["base_mb"] - r["kv_mb"] - fixed) for r in mine
                  if r["precision"] == p]
            per_byte[p] = round(sum(x * y for x, y in xy) / sum(x * x for x, _ in xy), 3)
        out[backend] = {"base_mb": round(base, 1), "fixed_mb": round(fixed, 1), "per_byte": per_byte,
                        "activations": fit_activations(backend, mine)}
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--make", type=Path, default=None, help="build the random bundles of SHAPES here first")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--refit", type=Path, default=None, help="fit MEASURED from a saved --json only")
    ap.add_argument("--fit", type=int, default=None, metavar="N",
                    help="fit MEASURED on the first N bundles only (the rest are held out); default: all")
    args = ap.parse_args()
    if args.refit:  # refit from a saved --json, measuring nothing
        saved = json.loads(args.refit.read_text())
        names = list(dict.fromkeys(r["bundle"] for r in saved))
        keep = set(names[:args.fit]) if args.fit is not None else set(names)
        print(json.dumps(fit([r for r in saved if r["bundle"] in keep]), indent=1))
        return 0
    bundles = list(args.bundles) + ([make_mid(args.make, n) for n in SHAPES] if args.make else [])

    from vlmexport.plan import ModelShape, activation_terms, artifact_sets, estimate, host_device, kv_cache_bytes
    from vlmexport.bundle import Bundle

    dev = host_device(bandwidth_gbs=10.0)  # bandwidth plays no part in memory
    rows = []
    for path in bundles:
        b = Bundle.open(path, verify="size")
        s = ModelShape.from_manifest(b.section("model"))
        images = max(1, min(s.max_length // s.image_tokens, 8))
        for a in artifact_sets(b):
            m = measure(path, a.backend, a.precision, s.max_length, images)
            e = estimate(s, a, dev, s.max_length, images)
            mb = 1 << 20
            rows.append({"bundle": path.name, "backend": a.backend, "precision": a.precision,
                         "files_mb": a.files_bytes / mb, **m,
                         "kv_mb": kv_cache_bytes(s, s.max_length, a.kv_bytes_per_element) / mb,
                         **dict(zip(("decoder_formula_mb", "vision_formula_mb"),
                                    (t / mb for t in activation_terms(s, s.max_length, images, a.backend)))),
                         "activations_mb": e.activations_gb * 1e9 / mb,
                         "predicted_mb": e.peak_gb * 1e9 / mb, "measured_terms": e.measured})
            r = rows[-1]
            print(f"{r['bundle']} {r['backend']} {r['precision']}: files {r['files_mb']:.1f} MB, base "
                  f"{r['base_mb']:.0f}, loaded {r['loaded_mb']:.0f}, peak {r['peak_mb']:.0f} MB; predicted "
                  f"{r['predicted_mb']:.0f} MB ({(r['predicted_mb'] / r['peak_mb'] - 1):+.1%})", flush=True)
    print("\nmeasured overhead terms -> vlmexport/plan.py MEASURED:")
    fitted = [r for r in rows if args.fit is None or r["bundle"] in {p.name for p in bundles[:args.fit]}]
    print(json.dumps(fit(fitted), indent=1))
    print("\n| bundle | backend | precision | weight files MB | KV MB | activations MB (predicted) | peak - loaded "
          "MB (measured) | predicted peak MB | measured peak RSS MB | error |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        flag = "" if r["measured_terms"] else " (load factor not measured)"
        print(f"| {r['bundle']} | {r['backend']} | {r['precision']}{flag} | {r['files_mb']:.1f} | {r['kv_mb']:.1f} | "
              f"{r['activations_mb']:.1f} | {r['peak_mb'] - r['loaded_mb']:.1f} | {r['predicted_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['predicted_mb'] / r['peak_mb'] - 1:+.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
