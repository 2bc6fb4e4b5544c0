"""Exact-match accuracy of the GGUF quantizations (with and without the multimodal imatrix)
of a training checkpoint: python scripts/gguf_quant_accuracy.py EXP_DIR STAGE_DIR N_PER_CATEGORY
(e.g. /work/exp/L1 stage2-scratch 100). Work files go to .cache/quant-eval/ (git-ignored)."""
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from vlmexport.training.recipes import Recipe, build_model, _load_weights
from vlmexport.models.checkpoint import save_pretrained
from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.pipeline.build import build
from vlmexport.evaluation.api import evaluate_path

exp = Path(sys.argv[1]); run = exp / sys.argv[2]; N = int(sys.argv[3])
work = Path(__file__).resolve().parent.parent / ".cache" / "quant-eval" / exp.name
md = work / "model"
if not (md / "config.json").is_file():
    r = Recipe.load(exp / "recipe.json")
    m = build_model(r)
    missing = m.load_state_dict(_load_weights(run), strict=False)
    print("missing", missing.missing_keys[:5], len(missing.missing_keys), flush=True)
    save_pretrained(m.eval(), md, Tokenizer(exp / "tokenizer.model"), PreprocessConfig(image_size=r.image_size))
res = {}
for tag, pairs in (("imatrix", 64), ("plain", 0)):
    b = work / f"bundle-{tag}"
    if not (b / "manifest.json").is_file():
        t0 = time.time()
        precs = ("f16", "q8_0", "q4_k_m", "q4_0") if tag == "imatrix" else ("q8_0", "q4_k_m", "q4_0")
        build(md, b, formats=("gguf",), precisions=precs, reference=True, validate=(tag == "imatrix"),
              e2e_prompts=14, imatrix_pairs=pairs, progress=lambda s: print(tag, s, flush=True))
        print(tag, "built in", round(time.time() - t0, 1), flush=True)
    precs = ("f16", "q8_0", "q4_k_m", "q4_0") if tag == "imatrix" else ("q8_0", "q4_k_m", "q4_0")
    for p in precs:
        rep = evaluate_path(b, n_per_category=N, backend="llamacpp", precision=p)
        res[f"{p}{'' if p == 'f16' else '+' + tag}"] = rep.overall
        print(tag, p, rep.overall, {c: round(v["accuracy"], 3) for c, v in rep.per_category.items()}, flush=True)
rep = evaluate_path(work / "bundle-imatrix", n_per_category=N, backend="torch")
res["torch fp32"] = rep.overall
print("torch", rep.overall, flush=True)
(work / "results.json").write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
