"""Two bundles' TensorRT-profile decoders (fp32), prefill against prefill on onnxruntime CPU.

For a change to ``exporter/tensorrt_decoder.py``: build the same model with the code before and
after it (``git worktree``), then compare the two graphs in one process: their logits on the same
prompt (one image and 32 text tokens, random image embeddings) and their prefill times over
alternating rounds (medians, and the median of the per-round ratios). docs/tensorrt.md, "The last
layer keeps the last position", used it:

    git worktree add /tmp/before <commit before>
    (cd /tmp/before && python -m vlmexport.cli build MODEL --format tensorrt --precision fp32 \
        --out /tmp/ab-before --no-validate)     # run inside the old tree: python -m puts the cwd first
    vlmexport build MODEL --format tensorrt --precision fp32 --out /tmp/ab-after --no-validate
    python benchmarks/tensorrt_profile_ab.py /tmp/ab-before /tmp/ab-after --threads 2

(MODEL: an absolute path; without one, the shipped demo model.) The two decoder graphs must
differ: the script stops if their ONNX files are byte-identical (the same code built both).

Not a test: the times depend on the machine and what else runs on it. A CPU only validates these
graphs; what TensorRT makes of them is not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vlmexport.bundle import Bundle
from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.runtimes.tensorrt_profile import OrtProfileExecutor, ProfileFiles, StaticCacheSession


def session(path: str, threads: int, capacity: int) -> tuple[StaticCacheSession, dict, ProfileFiles]:
    b = Bundle.open(path, verify="none")
    m = b.section("model")

    def f(part: str):
        return b.file(b.find(part, "tensorrt", "fp32").file)

    decode = b.find("text_decoder", "tensorrt", "fp32").extra.get("decode_graph")
    files = ProfileFiles(f("text_decoder"), f("token_embedding"), f("vision_encoder"), f("connector"),
                         b.file(decode) if decode else None)
    ex = OrtProfileExecutor(files, m["num_layers"], m["num_kv_heads"], m["head_dim"], capacity, threads=threads)
    return StaticCacheSession(ex, files.token_embedding, m["hidden_size"], m["vocab_size"]), m, files


def _graph_facts(path) -> tuple[bytes, int]:
    import onnx

    data = open(path, "rb").read()
    return data, len(onnx.load_from_string(data).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    a = ap.parse_args()
    (before, m, fb), (after, _, fa) = session(a.before, a.threads, 256), session(a.after, a.threads, 256)
    (gb, nb), (ga, na) = (_graph_facts(f.text_decoder) for f in (fb, fa))
    if gb == ga:
        raise SystemExit("the two bundles' decoder graphs are byte-identical: build 'before' inside the old tree "
                         "(see this script's docstring)")
    print(f"decoder graphs: before {nb} nodes, after {na} nodes")
    lay = build_layout([TextPiece((1,)), ImagePiece(m["image_tokens"]), TextPiece(tuple(range(5, 37)))],
                       m["expert_routing"], m["position_ids"], image_pad_id=m["pad_token_id"])
    emb = (np.random.default_rng(0).standard_normal((m["image_tokens"], m["hidden_size"])) * 0.02).astype(np.float32)
    x, y = before.prefill(lay, emb), after.prefill(lay, emb)
    print(f"{len(lay)} positions, {a.threads} thread(s): logits max difference {np.abs(x - y).max():.3g} "
          f"(largest logit {np.abs(x).max():.3g}), same argmax: {x.argmax() == y.argmax()}")
    ms: dict = {"before": [], "after": []}
    for r in range(a.rounds):
        order = (("before", before), ("after", after)) if r % 2 == 0 else (("after", after), ("before", before))
        for k, s in order:
            s.reset()
            t0 = time.perf_counter()
            s.prefill(lay, emb)
            ms[k].append((time.perf_counter() - t0) * 1000)
    ratios = sorted(q / p for q, p in zip(ms["after"], ms["before"]))
    print(f"prefill before {statistics.median(ms['before']):.1f} ms, after {statistics.median(ms['after']):.1f} ms, "
          f"per-round ratio median {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}), "
          f"{a.rounds} alternating rounds")


if __name__ == "__main__":
    main()
