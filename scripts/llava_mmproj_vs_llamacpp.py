"""A LLaVA mmproj from vlmexport's writer against the one llama.cpp's own tools write, both run
through llama-cpp-python, both compared with transformers.

llama.cpp's ``convert_hf_to_gguf.py --mmproj`` rejects LLaVA's CLIP tower ("Unsupported model
type: clip_vision_model"); its LLaVA 1.5 path is the legacy pair in tools/mtmd/legacy-models:
``llava_surgery_v2.py`` (projector out of the checkpoint) and ``convert_image_encoder_to_gguf.py``
(CLIP tower + projector). Both run unmodified, in subprocesses, on a copy of MODEL_DIR (a
``LlavaForConditionalGeneration`` saved by transformers, with ``tokenizer.model`` and
``preprocessor_config.json``). The legacy converter needs transformers 4.x (it reads
``CLIPVisionModel.vision_model``): pass a site-packages holding one with ``--legacy-pythonpath``.

Printed per mmproj: image embeddings against transformers' ``get_image_features`` (max abs
and relative difference, and the same shifted by one patch: llama.cpp's CLS-last bug) and
greedy agreement with PyTorch on test prompts (identical, near-ties, diverged), with our
text GGUF for both.

    python scripts/llava_mmproj_vs_llamacpp.py MODEL_DIR --llama-cpp $VLMEXPORT_LLAMA_CPP_DIR \\
        --legacy-pythonpath /tmp/venv4/lib/python3.11/site-packages [--prompts 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from vlmexport.core.preprocess import PreprocessConfig, preprocess
from vlmexport.pipeline.agreement import agreement
from vlmexport.exporter.gguf_writer import export_gguf
from vlmexport.pipeline.validate import GGUF_TOLERANCE, e2e_items
from vlmexport.runtimes import llamacpp_backend as lb
from vlmexport.runtimes.pipeline import Pipeline
from vlmexport.runtimes.torch_backend import pipeline_from_model_dir


def clip_dir(model_dir: Path, out: Path) -> Path:
    """The LLaVA's CLIP tower as a ``CLIPVisionModel`` directory (``vision_model.*`` keys), the
    input llama.cpp's legacy converter takes. Written from the checkpoint, not by
    ``save_pretrained``: transformers 5 saves a tower without the ``vision_model.`` prefix,
    which transformers 4 then silently re-initialises."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefixes = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                "vision_tower.")
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                p = next((p for p in prefixes if k.startswith(p)), None)
                if p is not None:
                    tensors["vision_model." + k[len(p):]] = st.get_tensor(k).contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    vision = json.loads((model_dir / "config.json").read_text())["vision_config"]
    (out / "config.json").write_text(json.dumps({**vision, "model_type": "clip_vision_model",
                                                 "architectures": ["CLIPVisionModel"]}))
    return out


def legacy_mmproj(model_dir: Path, work: Path, llama_cpp: Path, pythonpath: str | None) -> Path:
    d = work / "model"
    shutil.copytree(model_dir, d)
    clip = clip_dir(d, work / "clip")
    tools = llama_cpp / "tools" / "mtmd" / "legacy-models"
    subprocess.run([sys.executable, str(tools / "llava_surgery_v2.py"), "-m", str(d)], check=True,
                   capture_output=True)
    pre = PreprocessConfig.load(d / "preprocessor_config.json")
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    r = subprocess.run([sys.executable, str(tools / "convert_image_encoder_to_gguf.py"), "-m", str(clip),
                        "--clip-model-is-vision", "--llava-projector", str(d / "llava.projector"), "--output-dir",
                        str(work / "legacy"), "--use-f32", "--image-mean", *map(str, pre.image_mean), "--image-std",
                        *map(str, pre.image_std)], capture_output=True, text=True, env=env)
    if r.returncode or "newly initialized" in r.stderr + r.stdout:
        raise SystemExit(f"llama.cpp's legacy converter failed or did not load the tower (transformers 4.x "
                         f"needed: --legacy-pythonpath):\n{(r.stderr + r.stdout)[-2000:]}")
    return work / "legacy" / "mmproj-model-f32.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--llama-cpp", type=Path, default=os.environ.get("VLMEXPORT_LLAMA_CPP_DIR"))
    ap.add_argument("--legacy-pythonpath")
    ap.add_argument("--prompts", type=int, default=50)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from transformers import LlavaForConditionalGeneration

    ref = pipeline_from_model_dir(a.model_dir)
    items = e2e_items(type("S", (), {"preprocess": ref.preprocess_config})(), a.prompts)
    px = np.stack([preprocess(it.image, ref.preprocess_config) for it in items[:8]])
    hf = LlavaForConditionalGeneration.from_pretrained(a.model_dir).eval()
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=torch.tensor(px), vision_feature_layer=hf.config.vision_feature_layer,
                                    vision_feature_select_strategy=hf.config.vision_feature_select_strategy)
        out = getattr(out, "pooler_output", out)
        want = (torch.stack(list(out)) if isinstance(out, (list, tuple)) else out).numpy().reshape(len(px), -1,
                                                                                                  ref.session.model.config.hidden_size)
    lb.check_pair = lambda *args, **kw: None  # the legacy file states CLIP's projection_dim, not the LLM width
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours = export_gguf(a.model_dir, work / "ours", "f32")
        files = {"vlmexport": ours.mmproj, "llama.cpp legacy converter": legacy_mmproj(a.model_dir, work, a.llama_cpp,
                                                                                      a.legacy_pythonpath)}
        for name, mm in files.items():
            with lb.LlamaCppSession(ours.text, mm, n_ctx=ref.spec.max_length, n_threads=1) as s:
                got = s.encode_images(px)
                pipe = Pipeline(s, ref.tokenizer, ref.template, ref.preprocess_config, ref.spec,
                                backend="llamacpp-f32")
                row = agreement(ref, pipe, items, lambda x: GGUF_TOLERANCE["f32"] * x, "f32", "gguf", 0.0)
            scale = float(np.abs(want).max())
            report[name] = {"embeddings_max_abs_diff": float(np.abs(got - want).max()),
                            "embeddings_relative": float(np.abs(got - want).max()) / scale,
                            "shifted_by_one_relative": float(np.abs(got[:, :-1] - want[:, 1:]).max()) / scale,
                            "greedy_identical": f"{row['identical']}/{row['prompts']}",
                            "near_ties": row["near_ties"], "diverged": row["diverged"]}
            print(name, json.dumps(report[name]), flush=True)


if __name__ == "__main__":
    main()
