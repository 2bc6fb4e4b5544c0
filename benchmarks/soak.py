"""Soak: many generations per backend in one process, reporting resident memory (RSS) growth.

A server keeps one pipeline for days; a leak of a few kB per request (an image buffer kept,
a KV cache or llama.cpp batch not freed, a cache that only grows) shows here as RSS that
keeps climbing after the warm-up. Each backend gets its own fresh process (so one backend's
memory does not hide another's); every generation uses a different image (size, mode and
colours vary: PNG bytes, a path, a PIL image or an array) and prompt, with sampling on.

    python benchmarks/soak.py BUNDLE                                 # 1000 per backend
    python benchmarks/soak.py BUNDLE --backends onnxruntime --n 200 --every 20 --json soak.json

Reports per backend: RSS (MB) every ``--every`` generations, the growth from the first
sample after warm-up (generation ``--every``) to the end, and that growth per 1000
generations. Not a test: RSS depends on the allocator and on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = ["<image>What colour is the shape?", "<image>How many circles are there?", "<image>Is there a star?",
           "<image>What is written in the image?", "<image>Which bar is the tallest?"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_image(i: int, tmp: Path):
    """A different image each time, handed over in one of the four accepted forms."""
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    kind = i % 4
    if kind == 0:
        return arr
    img = Image.fromarray(arr).convert("RGBA" if i % 8 == 1 else "RGB")
    if kind == 1:
        return img
    b = io.BytesIO()
    img.save(b, "PNG")
    if kind == 2:
        return b.getvalue()
    p = tmp / f"soak-{i % 3}.png"
    p.write_bytes(b.getvalue())
    return p


def soak_one(bundle: str, backend: str, n: int, every: int, max_new_tokens: int, threads: int | None) -> dict:
    import tempfile

    from vlmexport.runtimes.loader import load

    t0 = time.perf_counter()
    pipe = load(bundle, backend=backend, threads=threads)
    series = [(0, round(rss_mb(), 1))]
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1, n + 1):
            out = pipe.generate(PROMPTS[i % len(PROMPTS)], [make_image(i, Path(tmp))], max_new_tokens=max_new_tokens,
                                temperature=0.8, top_p=0.95, seed=i)
            tokens += len(out)
            if i % every == 0 or i == n:
                series.append((i, round(rss_mb(), 1)))
    base = series[1][1] if len(series) > 2 else series[0][1]
    growth = series[-1][1] - base
    span = series[-1][0] - (series[1][0] if len(series) > 2 else 0)
    return {"backend": pipe.backend, "generations": n, "seconds": round(time.perf_counter() - t0, 1),
            "rss_mb": series, "growth_mb_after_warmup": round(growth, 1),
            "growth_mb_per_1000": round(growth * 1000 / span, 2) if span else None, "chars_out": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--backends", default="onnxruntime,llamacpp,torch")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # one backend in this process
        print(json.dumps(soak_one(a.bundle, a.child, a.n, a.every, a.max_new_tokens, a.threads)))
        return
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    results = []
    for backend in a.backends.split(","):
        cmd = [sys.executable, __file__, a.bundle, "--child", backend, "--n", str(a.n), "--every", str(a.every),
               "--max-new-tokens", str(a.max_new_tokens)] + (["--threads", str(a.threads)] if a.threads else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            results.append({"backend": backend, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        res = results[-1]
        if "error" in res:
            print(f"{backend}: FAILED {res['error']}")
        else:
            print(f"{res['backend']}: {res['generations']} generations in {res['seconds']} s; RSS MB "
                  + " ".join(f"{i}:{m}" for i, m in res["rss_mb"])
                  + f"; growth after warm-up {res['growth_mb_after_warmup']} MB ({res['growth_mb_per_1000']} MB"
                    " per 1000)")
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps({"bundle": a.bundle, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
