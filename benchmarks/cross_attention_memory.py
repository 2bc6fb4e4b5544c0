"""Cross-attention memory: what a cross-attending decoder step costs per image, in time and bytes.

Builds a synthetic cross-attending model (every architecture whose part spec has gated
cross-attention; flamingo by default) at a size where the cross-attention matters
(hidden 768, 6 layers, a block every 2 layers, 64 latents per image of width 768),
exports its text decoder and connector, and times onnxruntime decode steps with 0, 1, 2
and 4 images in the prompt. Prints the per-image memory the decoder is handed (what the
connector outputs) and the median decode-step time for each image count.

    python benchmarks/cross_attention_memory.py [--threads 2] [--steps 48]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmexport.core.layout import ImagePiece, TextPiece, build_layout
from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import export_text_decoder, export_token_embedding
from vlmexport.models import VisionConfig, seeded_init
from vlmexport.runtimes.onnxruntime_backend import OrtModelSession
from vlmexport.runtimes.spec import DecoderShape


def model(arch: str):
    from vlmexport.models import get_architecture

    A = get_architecture(arch)
    c = A.tiny_config(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                      image_token_id=7999, cross_layer_interval=2, resampler_n_latents=64, resampler_depth=1,
                      resampler_n_heads=8, resampler_head_dim=64,
                      vision_config=VisionConfig(image_size=32, patch_size=8, hidden_size=768, intermediate_size=1536,
                                                 num_hidden_layers=1, num_heads=12))
    m = seeded_init(A(c), 0).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "alpha" in name:
                p.fill_(0.5)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="flamingo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    a = ap.parse_args()
    m = model(a.arch)
    spec = m.part_specs(m.config).decoder
    with tempfile.TemporaryDirectory() as d:
        g = export_text_decoder(StateDictTensors(m), spec, Path(d) / "dec.onnx", "fp32", max_length=512)
        e = export_token_embedding(StateDictTensors(m), spec, Path(d) / "emb.safetensors", "fp32")
        s = OrtModelSession(g.path, e, DecoderShape(**g.runtime_facts()), intra_op_num_threads=a.threads,
                            vision_fallback=lambda px: m.image_embeddings(torch.from_numpy(px)).detach().numpy())
        size = m.config.vision_config.image_size
        per_image = None
        for n in (0, 1, 2, 4):
            pieces = [TextPiece(tuple(range(10, 20)))]
            for i in range(n):
                pieces += [ImagePiece(m.image_tokens()), TextPiece(tuple(range(30, 40)))]
            lo = build_layout(pieces, image_pad_id=m.image_placeholder_id(), image_placement=m.image_placement)
            px = np.random.default_rng(n).standard_normal((n, 3, size, size)).astype(np.float32) if n else None
            emb = s.encode_images(px) if n else None
            if n == 1:
                per_image = emb[0].nbytes
            logits = s.prefill(lo, emb)
            times = []
            for k in range(a.steps):
                t0 = time.perf_counter()
                logits = s.decode(int(np.argmax(logits)), lo.next_position + k)
                times.append(time.perf_counter() - t0)
            print(f"{n} image(s): decode step median {1e3 * statistics.median(times[4:]):.2f} ms")
        print(f"memory the decoder is handed per image: {per_image / 1e6:.3f} MB "
              f"({m.image_embeddings(torch.zeros(1, 3, size, size)).shape[1:]} float32)")


if __name__ == "__main__":
    main()
