"""``vlmexport bench``: image-encode latency, time to first token, decode tokens/s and
peak memory for every backend x precision of a bundle, side by side in one process,
plus the machine's memory read bandwidth and fp32 GEMM throughput measured in the same
run: decode is memory-bound (bytes of weights one token reads, counted from the artifact's
own tensors, x tokens/s over the bandwidth) and prefill compute-bound (its FLOPs over
TTFT minus image encode, against the GEMM throughput), so each row says how far it is
from the machine's limit.

``--synthetic bench-s`` / ``bench-l`` write random-weight checkpoints of realistic
CogVLM shapes, streamed shard by shard (bench-l is larger than this machine's RAM).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.errors import VlmexportError
from ..core.layout import ImagePiece, TextPiece, build_layout
from ..core.names import CpuPrefill, Part, Spin
from ..runtimes.environment import cpu_flags

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ synthetic models
SYNTHETIC = {
    # ~0.5B parameters with experts; ViT-B/16 at 224 px
    "bench-s": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                    num_attention_heads=16, max_position_embeddings=1024,
                    vision_config=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_heads=12)),
    # CogVLM-17B's decoder (32 x 4096, FFN 11008, two experts) with a 24-layer EVA-E-width
    # ViT: ~15B parameters, ~30 GB in bf16 - more than this machine's 24 GiB of RAM
    "bench-l": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048,
                    vision_config=dict(image_size=224, patch_size=14, hidden_size=1792, intermediate_size=15360,
                                       num_hidden_layers=24, num_heads=16)),
}
SHARD_BYTES = 2 << 30


def write_synthetic_checkpoint(name: str, out_dir: str | Path, dtype: str = "bfloat16", seed: int = 0,
                               progress: Callable[[str], None] = lambda s: None) -> Path:
    """A random-weight cogvlm model directory of a named shape, written shard by shard so
    that memory stays at one shard however large the model is."""
    import torch
    from safetensors.torch import save_file

    from ..assets import DEMO_MODEL
    from ..core.atomic import atomic_directory
    from ..core.preprocess import PreprocessConfig
    from ..models import get_architecture
    from ..models.base import VisionConfig

    if name not in SYNTHETIC:
        raise VlmexportError(f"unknown synthetic model {name!r}; choose one of {sorted(SYNTHETIC)}")
    shape = dict(SYNTHETIC[name])
    shape["vision_config"] = VisionConfig(**shape["vision_config"])
    arch = get_architecture("cogvlm")
    config = arch.tiny_config(**shape)
    with torch.device("meta"):
        model = arch(config)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(arch.config_to_hf(config) | {"torch_dtype": dtype}, indent=2))
        PreprocessConfig(image_size=config.vision_config.image_size).save(tmp / "preprocessor_config.json")
        tok = DEMO_MODEL / "tokenizer.model"
        if tok.is_file():
            (tmp / "tokenizer.model").write_bytes(tok.read_bytes())
        else:  # a fresh checkout before the demo model exists: a small tokenizer of our own
            from ..core.tokenizer import train_tokenizer

            train_tokenizer([f"question {i} answer {i * 7}" for i in range(2000)], tmp / "tokenizer.model", 512)
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, shards, weight_map = 0, [], {}
        items = list(model.state_dict().items())
        total = sum(t.numel() * tdtype.itemsize for _, t in items)
        n_shards = max(1, math.ceil(total / SHARD_BYTES))

        def flush() -> None:
            nonlocal shard, shard_bytes
            if not shard:
                return
            fname = f"model-{len(shards) + 1:05d}-of-{n_shards:05d}.safetensors"
            progress(f"write {fname}")
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            shards.append(fname)
            for k in shard:
                weight_map[k] = fname
            shard, shard_bytes = {}, 0

        for key, meta in items:
            if key.endswith("norm.weight") or key.endswith("layernorm.weight") or key.endswith("norm1.weight"):
                t = torch.ones(meta.shape, dtype=tdtype)
            elif key.endswith(".bias"):
                t = torch.zeros(meta.shape, dtype=tdtype)
            else:
                t = (torch.randn(meta.shape, generator=gen) * 0.02).to(tdtype)
            nbytes = t.numel() * t.element_size()
            if shard and shard_bytes + nbytes > SHARD_BYTES:
                flush()
            shard[key] = t
            shard_bytes += nbytes
        flush()
        # the file names were written with a provisional count: fix them up
        final = {}
        for i, fname in enumerate(shards):
            new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            if new != fname:
                os.replace(tmp / fname, tmp / new)
            final[fname] = new
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


# ----------------------------------------------------------------------- measuring
def read_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth: ``threads`` numpy reductions over one large array (best of n)."""
    a = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))  # warm-up (page faults)
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _layer_weights(model: dict) -> int:
    """Weights of one layer's expert (QKV, attention output, SwiGLU MLP)."""
    h, i, hd = model["hidden_size"], model["intermediate_size"], model["head_dim"]
    nh, kv = model["num_heads"], model["num_kv_heads"]
    return h * (nh + 2 * kv) * hd + nh * hd * h + 3 * h * i


def decode_weight_bytes(model: dict, bytes_per_weight: float) -> float:
    """Weights one decode token reads: the language expert of every layer, norms, LM head
    (the visual expert is never read at decode: its tokens are all text)."""
    h, L, v = model["hidden_size"], model["num_layers"], model["vocab_size"]
    return (L * _layer_weights(model) + v * h) * bytes_per_weight + (2 * L + 1) * h * 4


def decode_bytes_from_files(b, backend: str, precision: str) -> float | None:
    """Bytes one decode token reads, from the artifact itself: every text-decoder weight but
    the visual expert's, the token table and the RoPE tables (one row each per token).
    Counts what quantization really left (an fp32 LM head beside int4 layers, llama.cpp's
    per-tensor mixture); None where the backend has no such file (torch)."""
    if backend == "onnxruntime":
        import onnx

        from ..core.names import onnx_is_visual_expert as is_visual_expert

        a = b.find(Part.TEXT_DECODER, "onnx", precision)
        m = onnx.load(str(b.file(a.file)), load_external_data=False)
        total = 0
        for t in m.graph.initializer:
            if is_visual_expert(t.name) or t.name.startswith("rope."):
                continue
            if t.data_location == onnx.TensorProto.EXTERNAL:
                total += int({e.key: e.value for e in t.external_data}.get("length", 0))
            else:
                total += len(t.raw_data) or int(np.prod(t.dims)) * 4
        return float(total)
    if backend == "llamacpp":
        import gguf

        from ..core.names import (
            gguf_language_twin as language_twin,  # not None: a visual-expert tensor
        )

        a = b.find(Part.TEXT_DECODER, "gguf", precision)
        return float(sum(int(t.n_bytes) for t in gguf.GGUFReader(b.file(a.file)).tensors
                         if language_twin(t.name) is None and not t.name.startswith(("token_embd", "rope"))))
    return None


def prefill_flops(model: dict, tokens: int) -> float:
    """Multiply-adds x 2 of one prefill: every position through one expert's projections,
    causal attention scores and values, the LM head at the last position. A nominal figure,
    the same for every backend: the onnx decoder (its last layer keeps the last position only)
    and llama.cpp skip the last layer's attention output and MLP for the other positions, ~3/4
    of one layer's projections (bench-s: ~4.7% of this), so their GFLOP/s read that much high.
    The TensorRT profile's routed graph runs both experts' projections on every position (bench-s:
    ~2x this, less its trimmed last layer), so its GFLOP/s read about half of what it computes."""
    L, h, v = model["num_layers"], model["hidden_size"], model["vocab_size"]
    attn = 2 * 2 * L * model["num_heads"] * model["head_dim"] * tokens * (tokens + 1) / 2
    return 2.0 * L * _layer_weights(model) * tokens + attn + 2.0 * v * h


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matrix-multiply throughput with ``threads`` threads (torch's GEMM
    on n x n matrices, best of ``repeats``): the ceiling of a compute-bound prefill."""
    try:
        import torch
    except ImportError:  # a runtime-only install: numpy's BLAS (its own thread setting)
        torch = None
    if torch is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        a, bm = torch.randn(n, n), torch.randn(n, n)
    else:
        rng = np.random.default_rng(0)
        a, bm = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    try:
        a @ bm  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ bm
            best = min(best, time.perf_counter() - t0)
    finally:
        if torch is not None:
            torch.set_num_threads(before)
    return 2.0 * n ** 3 / best / 1e9


@dataclass
class BenchRow:
    backend: str
    precision: str
    image_encode_ms: float
    ttft_ms: float
    prefill_tokens: int
    decode_tok_s: float
    decode_ms_per_token: float
    peak_rss_mb: float
    weights_gb_per_token: float
    achieved_gbs: float
    bandwidth_fraction: float
    load_s: float
    size_mb: float = 0.0  # the bundle files this backend x precision loads
    accuracy: float | None = None  # exact match on the synthetic test split (--accuracy N)
    prefill_ms: float = 0.0  # TTFT minus image encode: connector, embedding lookup and the decoder prefill
    prefill_gflops: float = 0.0  # prefill_flops / prefill_ms
    prefill_fraction_of_peak: float = 0.0  # prefill_gflops / the run's measured fp32 GEMM throughput
    bundle: str = ""  # the bundle this row ran (``vlmexport bench A B`` times several side by side)


@dataclass
class BenchReport:
    bundle: str  # the first bundle (``bundles`` lists them all)
    machine: dict
    bandwidth_gbs: float
    threads: int
    gemm_gflops: float = 0.0  # fp32 GEMM throughput measured in the same run
    spin: str = "decode"  # when onnxruntime threads busy-wait between operators (load(spin=...))
    cpu_prefill: str = "auto"  # onnxruntime's int8-GEMM prefill (load(cpu_prefill=...), runtimes/cpu_prefill.py)
    bandwidth_samples_gbs: list[float] = field(default_factory=list)  # before and after the backends ran
    gemm_samples_gflops: list[float] = field(default_factory=list)  # bandwidth_gbs / gemm_gflops: their max
    rows: list[BenchRow] = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    bundles: list[str] = field(default_factory=list)
    interleaved: bool = False  # rows timed round by round, all loaded at once (run_bench(interleave=True))

    def where(self, bundle: str) -> str:
        """`` [label]`` naming ``bundle`` when several bundles ran side by side, else empty."""
        return f" [{bundle_label(bundle, self.bundles)}]" if len(self.bundles) > 1 else ""

    def label(self, r: BenchRow) -> str:
        """``backend-precision``, with the bundle's label when several bundles ran side by side."""
        return r.backend + self.where(r.bundle)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# the report's table (``vlmexport bench`` prints it): its columns and each row's cells
RAW_LLAMACPP = "llamacpp-raw"  # the anchor row's backend name (text GGUF, text prompt, llama.cpp's defaults)

COLUMNS = ("backend", "precision", "size MB", "encode ms", "TTFT ms", "prefill GFLOP/s", "of GEMM", "decode tok/s",
           "GB/s read", "of bandwidth", "peak RSS MB", "exact match")


def bundle_label(bundle: str, bundles: Sequence[str]) -> str:
    """The shortest tail of a bundle's path that tells it from the others ("qb", "b0/bundle")."""
    parts = Path(bundle).resolve().parts
    others = [Path(b).resolve().parts for b in bundles if Path(b).resolve().parts != parts]
    for k in range(1, len(parts) + 1):
        if all(o[-k:] != parts[-k:] for o in others):
            return str(Path(*parts[-k:]))
    return str(bundle)


def row_cells(r: BenchRow) -> tuple[str, ...]:
    return (r.backend, r.precision, f"{r.size_mb:.1f}", f"{r.image_encode_ms:.1f}", f"{r.ttft_ms:.1f}",
            f"{r.prefill_gflops:.0f}", f"{r.prefill_fraction_of_peak:.0%}", f"{r.decode_tok_s:.1f}",
            f"{r.achieved_gbs:.1f}", f"{r.bandwidth_fraction:.0%}", f"{r.peak_rss_mb:.0f}",
            "-" if r.accuracy is None else f"{r.accuracy:.1%}")


# The SIMD extensions that decide which CPU kernels onnxruntime (MLAS) and llama.cpp run, as
# /proc/cpuinfo spells them (x86 "flags", Arm "Features"), and how a bench title names them. Two VMs
# that both call themselves "AMD EPYC" differ here (AVX-512 with VNNI against AVX2 only), and the
# 4-bit kernels' speed with them (docs/results.md, "CPU speed against llama.cpp").
SIMD_FEATURES = (("amx_int8", "AMX-INT8"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
                 ("avx512_bf16", "BF16"), ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2"),
                 ("asimd", "NEON"), ("asimddp", "dotprod"), ("i8mm", "I8MM"), ("sve", "SVE"))


def cpu_features(cpuinfo: str) -> list[str]:
    """The :data:`SIMD_FEATURES` the first CPU in a /proc/cpuinfo text reports, in that order;
    AVX2 is left out where AVX-512 is there (every AVX-512 CPU has it)."""
    flags = cpu_flags(cpuinfo)
    names = [name for flag, name in SIMD_FEATURES if flag in flags]
    return [n for n in names if not (n == "AVX2" and "AVX-512" in names)]


def machine_info() -> dict:
    import platform

    cpu, text = "", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cpu_features": cpu_features(text), "logical_cpus": os.cpu_count(), "memory": mem,
            "platform": platform.platform(), "python": platform.python_version()}


def machine_title(machine: dict) -> str:
    """The CPU as a bench title names it: its model name and, in brackets, its SIMD extensions."""
    features = machine.get("cpu_features") or []
    return machine.get("cpu", "") + (f" ({', '.join(features)})" if features else "")


def bench_layout(model: dict, spec, bos_id: int, prompt_tokens: int):
    """The timed prompt: BOS, one image, ``prompt_tokens`` text tokens."""
    text = [5 + (k % 200) for k in range(prompt_tokens)]
    pieces = [TextPiece((bos_id,)), ImagePiece(model["image_tokens"]), TextPiece(tuple(text))]
    return build_layout(pieces, model["expert_routing"], model["position_ids"], image_pad_id=spec.placeholder_id,
                        image_placement=spec.image_placement)


class PipelineTimer:
    """One loaded pipeline's measurements, a round at a time (its session does the work; the loop
    is the shared one): image encode, time to first token (reset, encode, prefill, argmax), then
    ``decode_tokens`` steps. Warmed up on construction."""

    def __init__(self, pipe, model: dict, prompt_tokens: int, decode_tokens: int, load_s: float):
        self.pipe, self.session, self.backend, self.load_s = pipe, pipe.session, pipe.backend, load_s
        self.decode_tokens = decode_tokens
        size = pipe.preprocess_config.image_size
        self.pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        self.layout = bench_layout(model, pipe.spec, pipe.tokenizer.bos_id, prompt_tokens)
        self.positions = len(self.layout)
        self.session.encode_images(self.pixels)  # warm-up
        self.session.reset()
        self.session.prefill(self.layout, self.session.encode_images(self.pixels))

    def round(self) -> tuple[float, float, float]:
        """``(encode ms, TTFT ms, decode ms per token)`` of one round."""
        s = self.session
        t0 = time.perf_counter()
        s.encode_images(self.pixels)
        t1 = time.perf_counter()
        s.reset()
        int(np.argmax(s.prefill(self.layout, s.encode_images(self.pixels))))
        t2 = time.perf_counter()
        pos = self.layout.next_position
        for k in range(self.decode_tokens):
            s.decode(7 + k % 100, pos + k)
        t3 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000 / self.decode_tokens

    def close(self) -> None:
        self.pipe = self.session = None


class RawLlamaCppTimer:
    """The anchor row's measurements, a round at a time: raw llama.cpp on the bundle's text GGUF
    (runtimes/llamacpp_anchor.py), a text prompt of as many positions as the other rows' image
    prompt, so its TTFT is a prefill of the same length with no image encode. Loaded and warmed
    up on construction."""

    pipe = None

    def __init__(self, b, model: dict, precision: str, prompt_tokens: int, decode_tokens: int, threads: int):
        from ..runtimes.llamacpp_anchor import RawTextModel
        from ..runtimes.spec import model_spec

        self.backend = f"{RAW_LLAMACPP}-{precision}"
        self.decode_tokens = decode_tokens
        self.positions = len(bench_layout(model, model_spec(model), 1, prompt_tokens))
        self.model = RawTextModel(b.file(b.find(Part.TEXT_DECODER, "gguf", precision).file),
                                  self.positions + decode_tokens + 1, threads)
        self.load_s = self.model.load_s
        self.model.run(self.positions, decode_tokens)  # warm-up

    def round(self) -> tuple[float, float, float]:
        ttft, per_token, _ = self.model.run(self.positions, self.decode_tokens)
        return 0.0, ttft, per_token

    def close(self) -> None:
        self.model.close()


def timed_row(backend: str, precision: str, model: dict, rounds: Sequence[tuple[float, float, float]],
              prefill_tokens: int, bandwidth: float, load_s: float, decode_bytes: float | None,
              gemm: float) -> BenchRow:
    """A row from the medians of its rounds (``(encode ms, TTFT ms, decode ms per token)`` each)."""
    encode_ms = statistics.median(r[0] for r in rounds)
    ttft_ms = statistics.median(r[1] for r in rounds)
    ms = statistics.median(r[2] for r in rounds)
    tok_s = 1000.0 / ms
    if decode_bytes is None:  # no file to count from (torch runs the checkpoint in fp32 or bf16/fp16)
        decode_bytes = decode_weight_bytes(model, 2 if precision in ("bf16", "fp16") else 4)
    gb = decode_bytes / 1e9
    prefill_ms = max(ttft_ms - encode_ms, 1e-6)
    gflops = prefill_flops(model, prefill_tokens) / prefill_ms / 1e6
    return BenchRow(backend=backend, precision=precision, image_encode_ms=encode_ms, ttft_ms=ttft_ms,
                    prefill_tokens=prefill_tokens, decode_tok_s=tok_s, decode_ms_per_token=ms,
                    peak_rss_mb=_peak_rss_mb(), weights_gb_per_token=gb, achieved_gbs=gb * tok_s,
                    bandwidth_fraction=gb * tok_s / bandwidth, load_s=load_s, prefill_ms=prefill_ms,
                    prefill_gflops=gflops, prefill_fraction_of_peak=gflops / gemm if gemm else 0.0)


def loaded_artifacts(b, backend: str, precision: str) -> list:
    """The bundle artifacts that ``vlmexport.load(backend=, precision=)`` reads (the loader's
    per-part fallback to fp32 for quantized ONNX precisions included)."""
    if backend == "torch":
        return [b.find("model", "torch")]
    if backend == "llamacpp":
        return [b.find(part, "gguf", precision) for part in (Part.TEXT_DECODER, Part.MMPROJ)]
    if backend == RAW_LLAMACPP:
        return [b.find(Part.TEXT_DECODER, "gguf", precision)]
    from ..bundle import part_precision

    return [b.find(part, "onnx", part_precision(b.precisions(part, "onnx"), precision) or "fp32")
            for part in (Part.VISION_ENCODER, Part.CONNECTOR, Part.TEXT_DECODER, Part.TOKEN_EMBEDDING)]


def loaded_bytes(b, backend: str, precision: str) -> int:
    """Bytes of the bundle files that ``vlmexport.load(backend=, precision=)`` reads."""
    return sum(a.total_size_bytes for a in loaded_artifacts(b, backend, precision))


def _same_files_key(b, backend: str, precision: str) -> tuple:
    """Equal for two bundles whose backend x precision would run byte-identical files."""
    return (backend, precision, *((a.sha256, *(d["sha256"] for d in a.data_files))
                                  for a in loaded_artifacts(b, backend, precision)))


def run_bench(bundle: str | Path | Sequence[str | Path],
              backends: Sequence[str] = ("torch", "onnxruntime", "llamacpp"),
              precisions: Sequence[str] | None = None, prompt_tokens: int = 32, decode_tokens: int = 32,
              repeats: int = 3, threads: int | None = None, accuracy_per_category: int = 0,
              spin: bool | str = "decode", interleave: bool = False, cpu_prefill: str = "auto",
              progress: Callable[[str], None] = lambda s: None) -> BenchReport:
    """Every backend x precision of one or several bundles, side by side in this process
    (several bundles: two builds of one model, say block-32 and block-128 int4). With
    ``accuracy_per_category`` > 0 each is also scored (exact match) on that many synthetic
    test-split items per category: meaningful for models trained on the synthetic task.

    A backend x precision whose files are byte-identical to one already timed (the torch
    reference or the fp32 export that two builds of one model share) runs once. Each row's
    ratios are taken against its own bundle's torch fp32 and onnxruntime fp32 rows.

    ``interleave``: load every row first and time them round by round, for ratios that hold on a
    machine whose load changes; it holds every row's model in memory at once."""
    from ..bundle import Bundle
    from ..runtimes.loader import load
    from ..runtimes.environment import physical_cores

    bundles = [str(bundle)] if isinstance(bundle, (str, Path)) else [str(b) for b in bundle]
    if not bundles:
        raise VlmexportError("give at least one bundle to benchmark")
    threads = threads or physical_cores()
    opened = [(name, Bundle.open(name, verify="size")) for name in bundles]
    progress("measure memory bandwidth and GEMM throughput")
    bandwidth = read_bandwidth_gbs(threads)
    gemm = gemm_gflops(threads)
    report = BenchReport(bundle=bundles[0], machine=machine_info(), bandwidth_gbs=bandwidth, threads=threads,
                         gemm_gflops=gemm, spin=str(Spin.of(spin)), bandwidth_samples_gbs=[bandwidth],
                         cpu_prefill=str(CpuPrefill.of(cpu_prefill)),
                         gemm_samples_gflops=[gemm], bundles=bundles, interleaved=interleave)
    plan, by_key = [], {}
    for name, b in opened:  # what several bundles share (the torch reference, an fp32 export) runs once
        for backend, p in _plan(b, backends, precisions):
            key = _same_files_key(b, backend, p)
            if key not in by_key:
                by_key[key] = None
                plan.append((name, b, backend, p, key))
    def make_timer(name, b, backend, precision):
        model = b.section("model")
        if backend == RAW_LLAMACPP:
            return RawLlamaCppTimer(b, model, precision, prompt_tokens, decode_tokens, threads)
        t0 = time.perf_counter()
        pipe = load(name, backend=backend, precision=precision, threads=threads, verify="none", spin=spin,
                    cpu_prefill=cpu_prefill)
        return PipelineTimer(pipe, model, prompt_tokens, decode_tokens, time.perf_counter() - t0)

    def finish(entry, timer, rounds) -> None:
        name, b, backend, precision, key = entry
        row = timed_row(timer.backend, precision, b.section("model"), rounds, timer.positions, bandwidth,
                        timer.load_s, decode_bytes_from_files(b, "llamacpp" if backend == RAW_LLAMACPP else backend,
                                                              precision), gemm)
        row.size_mb, row.bundle = loaded_bytes(b, backend, precision) / 1e6, name
        if accuracy_per_category > 0 and timer.pipe is not None:
            progress(f"accuracy {backend} {precision}{report.where(name)}")
            row.accuracy = _accuracy(timer.pipe, accuracy_per_category)
        report.rows.append(row)
        by_key[key] = row
        timer.close()

    if interleave:
        # every row loaded at once, then each round times every row once in plan order: a change of
        # load on a shared machine lands on all rows of a round alike, so the ratios between rows hold
        # where sequential rows would each catch their own moment. Peak RSS is then the process's,
        # with everything loaded (the same figure on every row).
        timers = []
        for name, b, backend, precision, key in plan:
            progress(f"load {backend} {precision}{report.where(name)}")
            timers.append(make_timer(name, b, backend, precision))
        rounds: list[list] = [[] for _ in plan]
        for r in range(repeats):
            progress(f"interleaved round {r + 1} of {repeats}")
            for i, timer in enumerate(timers):
                rounds[i].append(timer.round())
        for entry, timer, rs in zip(plan, timers, rounds):
            finish(entry, timer, rs)
    else:
        for entry in plan:
            name, b, backend, precision, key = entry
            progress(f"bench {backend} {precision}{report.where(name)}")
            gc.collect()
            _reset_peak_rss()
            timer = make_timer(name, b, backend, precision)
            finish(entry, timer, [timer.round() for _ in range(repeats)])
            del timer
            gc.collect()
    _remeasure_ceilings(report, threads)
    # each row against its own bundle's torch and onnxruntime fp32 rows (timed under another bundle's
    # name where the files are the same), so two different models never share a base
    bases = {name: {backend: by_key.get(_same_files_key(b, backend, "fp32"))
                    for backend, _ in _plan(b, ("torch", "onnxruntime"), ("fp32",))} for name, b in opened}
    for kind in ("torch", "onnxruntime"):
        for r in report.rows:
            base = bases[r.bundle].get(kind)
            if base is not None and base is not r and not r.backend.startswith(RAW_LLAMACPP):
                report.ratios[f"{report.label(r)} / {report.label(base)}"] = _ratio(r, base)
    # and against the raw llama.cpp anchor: the same GGUF precision where there is one (the llamacpp
    # backend's overhead), else q4_0 (onnxruntime's int4 against llama.cpp's usual CPU format)
    raw = {name: {p: by_key.get(_same_files_key(b, RAW_LLAMACPP, p)) for _, p in _plan(b, (RAW_LLAMACPP,), None)}
           for name, b in opened}
    for r in report.rows:
        anchors = raw[r.bundle]
        base = anchors.get(r.precision) or anchors.get("q4_0")
        if base is not None and base is not r and not r.backend.startswith(("torch", RAW_LLAMACPP)):
            report.ratios[f"{report.label(r)} / {report.label(base)}"] = _ratio(r, base)
    return report


def _ratio(r: BenchRow, base: BenchRow) -> dict:
    """``r`` over ``base``: decode tokens/s, TTFT, prefill (TTFT minus image encode) and image encode
    (None where either row has none: the raw llama.cpp anchor's prompt is text)."""
    return {"decode_tok_s": r.decode_tok_s / base.decode_tok_s, "ttft": r.ttft_ms / base.ttft_ms,
            "prefill": r.prefill_ms / base.prefill_ms,
            "image_encode": r.image_encode_ms / base.image_encode_ms if r.image_encode_ms and base.image_encode_ms
            else None}


def ratio_line(name: str, ratio: dict) -> str:
    """One ratio as ``vlmexport bench`` prints it."""
    parts = [f"decode x{ratio['decode_tok_s']:.2f}", f"TTFT x{ratio['ttft']:.2f}"]
    if ratio.get("prefill") is not None:
        parts.append(f"prefill x{ratio['prefill']:.2f}")
    if ratio.get("image_encode") is not None:
        parts.append(f"image encode x{ratio['image_encode']:.2f}")
    return f"{name}: {', '.join(parts)}"


def report_title(report: BenchReport) -> str:
    seen = "/".join(f"{x:.1f}" for x in report.bandwidth_samples_gbs)
    return (f"{', '.join(report.bundles)}: {machine_title(report.machine)}, {report.threads} threads, read bandwidth "
            f"{report.bandwidth_gbs:.1f} GB/s (best of {seen}, before/after), fp32 GEMM {report.gemm_gflops:.0f} "
            f"GFLOP/s, cpu prefill {report.cpu_prefill}"
            + (", rows interleaved round by round" if report.interleaved else ""))


def report_markdown(report: BenchReport) -> str:
    """The report as plain text: a title, a Markdown pipe table (every cell whole, however wide) and
    one line per ratio. ``vlmexport bench`` prints this when its output is piped or logged."""
    multi = len(report.bundles) > 1
    cols = ("bundle",) * multi + COLUMNS
    rows = [(bundle_label(r.bundle, report.bundles),) * multi + row_cells(r) for r in report.rows]
    width = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    left = {"bundle", "backend", "precision"}

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, width, cols)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if h not in left else ("-" * (w + 2)) for w, h in zip(width, cols)) + "|"
    lines = [report_title(report), "", line(cols), rule, *(line(r) for r in rows), ""]
    lines += [ratio_line(name, ratio) for name, ratio in report.ratios.items()]
    return "\n".join(lines)


def _plan(b, backends: Sequence[str], precisions: Sequence[str] | None) -> list[tuple[str, str]]:
    """(backend, precision) pairs of one bundle that this installation can run."""
    plan = []
    for backend in backends:
        if backend == "torch":  # only where the bundle carries the PyTorch reference (not --no-reference)
            if any(a.format == "torch" for a in b.artifacts):
                plan += [("torch", p) for p in (precisions or ["fp32"]) if p in ("fp32", "bf16")]
        elif backend == "onnxruntime":
            plan += [("onnxruntime", p) for p in b.precisions(Part.TEXT_DECODER, "onnx")
                     if precisions is None or p in precisions]
        elif backend in ("llamacpp", RAW_LLAMACPP):
            from ..runtimes.llamacpp_backend import llamacpp_available

            if llamacpp_available():
                plan += [(backend, p) for p in b.precisions(Part.TEXT_DECODER, "gguf")
                         if precisions is None or p in precisions]
        else:
            raise VlmexportError(f"unknown backend {backend!r}; choose from torch, onnxruntime, llamacpp, "
                                 f"{RAW_LLAMACPP}")
    return plan


def _remeasure_ceilings(report: BenchReport, threads: int) -> None:
    """Measure bandwidth and GEMM again after the backends ran and keep the best of both runs.

    On a shared VM the read bandwidth moves between runs (the same 2-vCPU machine: 33-47 GB/s
    within minutes), and a ceiling caught at a low moment puts a backend above 100% of it.
    Fractions are recomputed against the higher ceiling, so they are never flattering.
    """
    if not report.rows:
        return
    report.bandwidth_samples_gbs.append(read_bandwidth_gbs(threads))
    report.gemm_samples_gflops.append(gemm_gflops(threads))
    report.bandwidth_gbs = max(report.bandwidth_samples_gbs)
    report.gemm_gflops = max(report.gemm_samples_gflops)
    for r in report.rows:
        r.bandwidth_fraction = r.achieved_gbs / report.bandwidth_gbs
        r.prefill_fraction_of_peak = r.prefill_gflops / report.gemm_gflops if report.gemm_gflops else 0.0


def _accuracy(pipe, n_per_category: int) -> float:
    from ..data import SyntheticVQA
    from ..evaluation.runner import evaluate

    pipe.session.reset()
    items = SyntheticVQA(image_size=pipe.preprocess_config.image_size, seed=0).eval_items("test", n_per_category)
    return evaluate(pipe, items).overall


def plot_report(report: BenchReport, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VlmexportError("the PNG chart needs matplotlib; install it with `pip install 'vlmexport[plot]'`") from None
    labels = [report.label(r) for r in report.rows]
    colours = ["#888" if r.backend.startswith("torch") else "#2a6" for r in report.rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tokens/s (higher is better)"),
                           (axes[1], "ttft_ms", "time to first token, ms"),
                           (axes[2], "peak_rss_mb", "peak RSS, MB")):
        vals = [getattr(r, key) for r in report.rows]
        ax.bar(range(len(vals)), vals, color=colours)
        ax.set_xticks(range(len(vals)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        for k, v in enumerate(vals):
            ax.text(k, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax = axes[3]  # every artifact set: size against decode speed, accuracy where measured
    for r, colour in zip(report.rows, colours):
        ax.scatter(r.size_mb, r.decode_tok_s, color=colour)
        acc = "" if r.accuracy is None else f" {r.accuracy * 100:.1f}%"
        ax.annotate(f"{r.backend.split('-')[0]} {r.precision}{report.where(r.bundle)}{acc}", (r.size_mb, r.decode_tok_s), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("size, MB", fontsize=8)
    ax.set_ylabel("decode tokens/s", fontsize=8)
    ax.set_title("size vs speed (label: exact match)", fontsize=10)
    fig.suptitle(f"{', '.join(bundle_label(b, report.bundles) for b in report.bundles)}: "
                 f"{machine_title(report.machine)}, {report.threads} threads, "
                 f"read bandwidth {report.bandwidth_gbs:.1f} GB/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
