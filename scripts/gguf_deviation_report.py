"""What a validated ``vlmexport build --format onnx,gguf --allow-deviations`` records, per model.

Tiny seeded models (random weights, every parameter jittered) are saved, built into
bundles (ONNX fp32 + fp16, GGUF f32 + f16) with ``e2e_prompts`` greedy test prompts, and
the manifest's figures are printed as JSON: per end-to-end row identical / near-ties /
diverged, and the GGUF deviation record (image-embedding and prompt-logit distance to
PyTorch, greedy agreement). Models:

- ``llava-hf``: a tiny LLaVA built and saved by transformers' own classes (whatever
  transformers is installed), CLIP tower with 3 layers, ``vision_feature_layer=-2``;
- ``llava``, ``cogvlm``, ``hf_cogvlm``: vlmexport's tiny configs.

    python scripts/gguf_deviation_report.py --out /tmp/report.json [--prompts 50] [--models llava-hf,hf_cogvlm]

``--models`` may also name a model directory (e.g. the ``llava-hf`` model saved by another
transformers version: ``--save-llava-hf DIR`` writes it and exits).

docs/export.md quotes what this printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import train_tokenizer
from vlmexport.pipeline.build import build
from vlmexport.models import get_architecture, seeded_init
from vlmexport.models.checkpoint import save_pretrained
from vlmexport.data import SyntheticVQA

IMAGE_SIZE, VOCAB = 32, 320


def _jitter(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def ours(arch: str, d: Path, tokenizer: Path, seed: int, **overrides) -> Path:
    A = get_architecture(arch)
    model = _jitter(seeded_init(A(A.tiny_config(**overrides)), seed), seed + 1000).eval()
    return save_pretrained(model, d, tokenizer, PreprocessConfig(image_size=IMAGE_SIZE))


def llava_hf(d: Path, tokenizer: Path, seed: int) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.05)
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + noise)
    model.save_pretrained(d)
    PreprocessConfig(image_size=IMAGE_SIZE).save(d / "preprocessor_config.json")
    shutil.copyfile(tokenizer, d / "tokenizer.model")
    return d


def summarize(manifest: dict, seconds: float) -> dict:
    v = manifest["validation"]
    e2e = [{k: r.get(k) for k in ("backend", "prompts", "identical", "near_ties", "diverged", "required",
                                  "near_tie_at")} for r in v["end_to_end"]]
    return {"seconds": round(seconds, 1), "end_to_end": e2e, "deviations": manifest.get("semantics_deviations", []),
            "failed": v.get("failed", [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--models", default="llava-hf,llava,cogvlm,hf_cogvlm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-llava-hf", type=Path, help="only save the tiny transformers LLaVA into this directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.save_llava_hf:
        with tempfile.TemporaryDirectory() as tmp:
            tok = train_tokenizer(SyntheticVQA(image_size=IMAGE_SIZE).corpus(300), Path(tmp) / "tokenizer.model",
                                  vocab_size=VOCAB)
            llava_hf(a.save_llava_hf, tok, a.seed)
        return
    warnings.simplefilter("ignore")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = train_tokenizer(SyntheticVQA(image_size=IMAGE_SIZE).corpus(300), root / "tokenizer.model",
                              vocab_size=VOCAB)
        for name in a.models.split(","):
            d = root / Path(name).name
            if Path(name).is_dir():  # a model directory saved elsewhere (e.g. by another transformers version)
                shutil.copytree(name, d)
                if not (d / "tokenizer.model").is_file():
                    shutil.copyfile(tok, d / "tokenizer.model")
            elif name == "llava-hf":
                llava_hf(d, tok, a.seed)
            elif name == "hf_cogvlm":
                ours("cogvlm", d, tok, a.seed, expert_routing="hf_cogvlm", position_ids="hf_cogvlm")
            else:
                ours(name, d, tok, a.seed)
            t0 = time.perf_counter()
            out = root / f"{Path(name).name}-bundle"
            build(d, out, formats=("onnx", "gguf"), precisions=("fp32", "fp16"), reference=False,
                  e2e_prompts=a.prompts, imatrix_pairs=0, allow_deviations=True)
            report[Path(name).name] = summarize(json.loads((out / "manifest.json").read_text()), time.perf_counter() - t0)
            print(json.dumps({Path(name).name: report[Path(name).name]}, indent=1), flush=True)
    a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
