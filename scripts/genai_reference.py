"""onnxruntime-genai's model builder on a LLaMA of bench-s's text shape, timed on this machine.

The reference the speed targets of the split-ONNX and quantization issues quote ("genai's
builder, fp32: about 39 tok/s; int4 about 160 tok/s"), measured here instead of quoted: a
random-weight ``LlamaForCausalLM`` (hidden 1024, 16 layers, 16 heads, FFN 2816, vocab 32000:
bench-s without its visual experts and vision tower) is exported by
``python -m onnxruntime_genai.models.builder`` in fp32, int4 (its default: the LM head in
int4 too) and int4 with the LM head kept fp32 (``nodes_to_exclude=/lm_head/MatMul``, the
closest it offers to vlmexport's int8 LM head), then each decodes with genai's own
generator, greedy, with the same prompt length and decode steps as ``vlmexport bench``
(231 prompt tokens, 32 new tokens, median of 3). Threads are set to the physical cores
(genai leaves onnxruntime's default otherwise).

Not part of the package (it needs ``onnxruntime-genai`` and ``transformers``); run it in a
separate environment::

    python -m venv /tmp/genai && . /tmp/genai/bin/activate
    pip install torch==2.13.0 transformers onnxruntime onnxruntime-genai tokenizers onnx onnx-ir
    python scripts/genai_reference.py --workdir runs/genai
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
VARIANTS = {"fp32": ["-p", "fp32"], "int4": ["-p", "int4"],
            "int4-lm_head-fp32": ["-p", "int4", "--extra_options", "nodes_to_exclude=/lm_head/MatMul"]}


def write_model(hf: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (hf / "config.json").is_file():
        return
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(hf, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SHAPE["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # the builder copies a tokenizer; its content is unused
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(hf)


def build(hf: Path, out: Path, args: list[str], threads: int) -> None:
    if not (out / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-e", "cpu", "-c", str(out.parent / "cache"), *args], check=True, stdout=subprocess.DEVNULL)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=1))


def time_decode(model_dir: Path, prompt: int, new: int, reps: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    ttft, tps = [], []
    for _ in range(reps + 1):  # the first run warms up
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False)
        g = og.Generator(model, p)
        t0 = time.perf_counter()
        g.append_tokens(np.arange(3, 3 + prompt, dtype=np.int32))
        t1 = time.perf_counter()
        n = 0
        while not g.is_done() and n < new:
            g.generate_next_token()
            n += 1
        tps.append(n / (time.perf_counter() - t1))
        ttft.append(1000 * (t1 - t0))
    return {"prefill_ms": round(statistics.median(ttft[1:]), 1), "decode_tok_s": round(statistics.median(tps[1:]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/genai"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prompt-tokens", type=int, default=231)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    write_model(a.workdir / "hf")
    results = {}
    for name, args in VARIANTS.items():
        build(a.workdir / "hf", a.workdir / name, args, a.threads)
        results[name] = time_decode(a.workdir / name, a.prompt_tokens, a.new_tokens, a.reps)
        print(name, results[name], flush=True)
    for name in ("int4", "int4-lm_head-fp32"):
        print(f"{name} / fp32 decode: {results[name]['decode_tok_s'] / results['fp32']['decode_tok_s']:.2f}x")
    (a.workdir / "genai_reference.json").write_text(json.dumps({"threads": a.threads, **results}, indent=1))


if __name__ == "__main__":
    main()
