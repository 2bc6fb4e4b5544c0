"""Calibrated int8 / GPTQ int4 ONNX builds of every architecture in the registry (tests/quant/test_quant.py
covers the machinery in depth on cogvlm). Generated from the registry: an architecture without
visual experts has no ``token_type`` decoder input, so the GPTQ calibration feeds must not carry one."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")  # onnxruntime's MatMulNBits quantizer needs it

from vlmexport.models import architectures  # noqa: E402
from vlmexport.pipeline.quantize import QuantOptions  # noqa: E402
from vlmexport.quant.calib import CalibrationSettings  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(architectures()))
def test_int8_and_gptq_int4_build_and_run(arch, tiny_model_dir, tmp_path):
    import vlmexport
    from vlmexport.pipeline.build import build

    d = tiny_model_dir(arch, seed=4, jitter=True)
    out = tmp_path / "bundle"
    build(d, out, formats=("onnx",), precisions=("fp32", "int8", "int4"), reference=False, e2e_prompts=2,
          quant=QuantOptions(calibration=CalibrationSettings(images=8, pairs=4), eval_per_category=2,
                             allow_degraded=True, algorithm="gptq", cache_dir=str(tmp_path)))
    scores = json.loads((out / "manifest.json").read_text())["calibration"]["onnx"]["scores"]
    assert set(scores) == {"int8", "int4"}
    for precision in ("int8", "int4"):
        pipe = vlmexport.load(out, backend="onnxruntime", precision=precision)
        assert isinstance(pipe.generate("what is shown?", [np.zeros((32, 32, 3), np.uint8)], max_new_tokens=3), str)
