"""First-answer-token logits of GGUF quantizations against the torch fp32 reference.

Finer than exact match on a model whose quantization drop is within noise: for every test
prompt (one image + question, the pipeline's own template), the next-token logits after
the prompt are compared with torch fp32: top-1 agreement, mean cosine, mean KL(fp32 || gguf).

    python scripts/gguf_logit_agreement.py REF_BUNDLE LABEL=BUNDLE:PRECISION [...] [--per-category 200]

REF_BUNDLE must hold the PyTorch reference (built without --no-reference); docs/results.md
has the figures this printed for the demo model.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from vlmexport.core.prompt import Turn
from vlmexport.runtimes.loader import load
from vlmexport.data import SyntheticVQA


def _logits(pipe, layout, pixels) -> np.ndarray:
    out = np.asarray(pipe.session.prefill(layout, pipe.session.encode_images(pixels)), np.float64)
    pipe.session.reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("candidates", nargs="+", help="LABEL=BUNDLE:PRECISION (llamacpp backend)")
    ap.add_argument("--per-category", type=int, default=200)
    a = ap.parse_args()
    ref = load(a.reference, backend="torch")
    items = SyntheticVQA(image_size=ref.preprocess_config.image_size, seed=0).eval_items("test", a.per_category)
    pipes = {}
    for c in a.candidates:
        label, spec = c.split("=", 1)
        bundle, precision = spec.rsplit(":", 1)
        pipes[label] = load(bundle, backend="llamacpp", precision=precision)
    acc = {label: [0, [], []] for label in pipes}
    for it in items:
        layout, px = ref.prepare([Turn(user=it.question, images=1)], [it.image])
        a_ = _logits(ref, layout, px)
        p = np.exp(a_ - a_.max())
        p /= p.sum()
        for label, pipe in pipes.items():
            b = _logits(pipe, layout, px)
            logq = b - b.max()
            logq -= np.log(np.exp(logq).sum())
            acc[label][0] += int(a_.argmax() == b.argmax())
            acc[label][1].append(float(a_ @ b / (np.linalg.norm(a_) * np.linalg.norm(b))))
            acc[label][2].append(float((p * (np.log(p + 1e-300) - logq)).sum()))
    print(json.dumps({label: {"prompts": len(items), "top1_agreement": v[0] / len(items),
                              "mean_cosine": float(np.mean(v[1])), "mean_kl": float(np.mean(v[2]))}
                      for label, v in acc.items()}, indent=1))


if __name__ == "__main__":
    main()
