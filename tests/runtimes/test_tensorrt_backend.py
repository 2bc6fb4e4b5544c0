"""The ``tensorrt`` backend, the ``engines`` / ``doctor`` commands.

Run here (no GPU, no TensorRT): ``vlmexport.load(..., backend="tensorrt", device="cpu")``
runs the TensorRT-profile graphs on onnxruntime and answers like the torch reference;
``doctor`` audits a bundle (exit 1 when something would not parse) and reports the
machine; ``engines`` without TensorRT fails with one line saying what to install.

Marked ``tensorrt`` + ``gpu`` (skipped here, never executed in this project so far):
engines built with TensorRT's own builder from a bundle, then greedy answers of the
engine backend against the same graphs on onnxruntime.
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import vlmexport
from vlmexport.bundle import BundleError
from vlmexport.cli import app
from vlmexport.pipeline.build import build
from vlmexport.runtimes.tensorrt_backend import ort_tensorrt_providers

ANSI = re.compile(r"\x1b\[[0-9;]*m")
runner = CliRunner()


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    r.plain = ANSI.sub("", r.output)
    return r


def has_trt_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def bundle_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    build(tiny_model_dir("cogvlm", jitter=True), out, formats=("tensorrt",), precisions=("fp32", "fp16"),
          reference=True, validate=False)
    return out


def test_load_tensorrt_backend_on_cpu_matches_torch(bundle_dir, images):
    trt = vlmexport.load(bundle_dir, backend="tensorrt", precision="fp32", threads=1)
    ref = vlmexport.load(bundle_dir, backend="torch", threads=1)
    assert trt.backend == "tensorrt-profile-onnxruntime-cpu-fp32"
    for img in images:
        a = ref.generate("<image> What is shown?", [img], max_new_tokens=8)
        b = trt.generate("<image> What is shown?", [img], max_new_tokens=8)
        assert a == b
    assert vlmexport.load(bundle_dir, backend="tensorrt", threads=1).backend.endswith("fp32")  # cpu prefers fp32
    with pytest.raises(BundleError, match="no int8 TensorRT profile"):
        vlmexport.load(bundle_dir, backend="tensorrt", precision="int8")


def test_ort_tensorrt_provider_options(tmp_path):
    (trt, opts), cuda = ort_tensorrt_providers(tmp_path)
    assert trt == "TensorrtExecutionProvider" and cuda == "CUDAExecutionProvider"
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    assert opts["trt_engine_cache_path"].startswith(str(tmp_path))


def test_doctor_audits_a_bundle(bundle_dir, tiny_model_dir, tmp_path):
    r = invoke("doctor", bundle_dir, "--target", "jetson-orin")
    assert r.exit_code == 0, r.plain
    assert "TensorRT 10.3" in r.plain and "text_decoder.fp16.decode.onnx" in r.plain
    assert "every node parses" in r.plain
    onnx_bundle = tmp_path / "onnx-bundle"
    build(tiny_model_dir("cogvlm"), onnx_bundle, formats=("onnx",), precisions=("fp16",), reference=False,
          validate=False)
    r = invoke("doctor", onnx_bundle, "--target", "jetson-orin")
    assert r.exit_code == 1
    assert "GroupQueryAttention" in r.plain and "com.microsoft" in r.plain and "no TensorRT profile" in r.plain


def test_doctor_reports_the_machine():
    import json

    from vlmexport.runtimes.cpu_prefill import lacks_int8_dot
    from vlmexport.runtimes.environment import physical_cores

    r = invoke("doctor")
    assert r.exit_code == 0, r.plain
    for word in ("TensorRT", "onnxruntime", "llama.cpp", "CPUExecutionProvider", "backends on this machine",
                 f"threads: {physical_cores()} (physical cores"):
        assert word in r.plain
    assert ("int8-GEMM prefill copy" in r.plain) == lacks_int8_dot()
    cpu = json.loads(invoke("doctor", "--json").stdout)["cpu"]
    assert cpu["physical_cores"] == physical_cores() and cpu["int8_prefill_copy"] == lacks_int8_dot()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_engines_without_tensorrt_says_what_to_install(bundle_dir):
    r = invoke("engines", bundle_dir)
    assert r.exit_code == 2
    assert "TensorRT is not installed" in r.plain and "pypi.nvidia.com" in r.plain


# ------------------------------------------------------------ needs TensorRT and a GPU
@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not has_trt_gpu(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_build_and_answer_like_onnxruntime(bundle_dir, images, precision):  # pragma: no cover
    r = invoke("engines", bundle_dir, "--precision", precision)
    assert r.exit_code == 0, r.plain
    assert "built" in r.plain
    r = invoke("engines", bundle_dir, "--precision", precision)
    assert "cached" in r.plain and "built" not in r.plain.split("status")[-1]
    gpu = vlmexport.load(bundle_dir, backend="tensorrt", precision=precision, device="cuda")
    cpu = vlmexport.load(bundle_dir, backend="tensorrt", precision=precision, device="cpu")
    assert gpu.backend == f"tensorrt-{precision}"
    same = sum(gpu.generate("<image> What is shown?", [im], max_new_tokens=8)
               == cpu.generate("<image> What is shown?", [im], max_new_tokens=8) for im in images)
    assert same == len(images) if precision == "fp32" else same >= len(images) - 1
    px = np.zeros((1, 3, 32, 32), np.float32)
    e_gpu, e_cpu = gpu.session.encode_images(px), cpu.session.encode_images(px)
    assert np.abs(e_gpu - e_cpu).max() <= (1e-3 if precision == "fp32" else 2e-2) * max(1.0, np.abs(e_cpu).max())
