"""Compare two bundles of the same model (e.g. built before and after a refactor): file hashes,
the manifest's validation section, and greedy answers on fixed test prompts per backend.

    python scripts/compare_bundles.py BEFORE_BUNDLE AFTER_BUNDLE [--prompts 40]

Answers are computed with the installed vlmexport for both bundles, so this compares what
the builds wrote; run each bundle's answers under its own checkout (``--answers-only``
writes them to JSON) to compare two versions of the runtime as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import vlmexport
from vlmexport.data import SyntheticVQA

ROWS = (("torch", None), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("llamacpp", "f16"))


def answers(bundle: Path, n: int) -> dict[str, list[str]]:
    m = json.loads((bundle / "manifest.json").read_text())
    items = SyntheticVQA(image_size=m["preprocessing"]["image_size"], seed=0).eval_items("test", -(-n // 7))[:n]
    out = {}
    formats = {(a["format"], a["precision"]) for a in m["artifacts"]}
    for backend, precision in ROWS:
        fmt = {"torch": "torch", "onnxruntime": "onnx", "llamacpp": "gguf"}[backend]
        if not any(f == fmt and (precision is None or p == precision) for f, p in formats):
            continue
        pipe = vlmexport.load(bundle, backend=backend, precision=precision)
        out[f"{backend}-{precision or 'reference'}"] = [pipe.generate(it.question, [it.image], max_new_tokens=16)
                                                        for it in items]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--prompts", type=int, default=40)
    args = ap.parse_args()
    mb, ma = (json.loads((b / "manifest.json").read_text()) for b in (args.before, args.after))
    differ = sorted(f for f in set(mb["files"]) | set(ma["files"]) if mb["files"].get(f) != ma["files"].get(f))
    print(f"files: {len(mb['files'])} before, {len(ma['files'])} after, {len(differ)} differ {differ[:8]}")
    same_validation = mb.get("validation") == ma.get("validation")
    print(f"validation section identical: {same_validation}")
    ab, aa = answers(args.before, args.prompts), answers(args.after, args.prompts)
    ok = not differ and same_validation
    for row in sorted(set(ab) | set(aa)):
        x, y = ab.get(row, []), aa.get(row, [])
        same = sum(p == q for p, q in zip(x, y))
        ok &= same == len(x) == len(y)
        print(f"{row}: {same}/{max(len(x), len(y))} greedy answers identical")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
