"""INT8 / INT4 weights in the TensorRT-profile decoder: explicit, symmetric DequantizeLinear.

TensorRT builds quantized engines from explicit Q/DQ only (implicit INT8 calibration is
deprecated in 10 and gone in 11). Here the decoder's projections keep float activations
and store their weights quantized, dequantized in the graph right before the MatMul
(weight-only quantization, which TensorRT fuses into its weight-only GEMMs):

- ``int8``: per-output-channel INT8 (``DequantizeLinear`` axis 1 of the ``[in, out]``
  weight), scale = max|w| / 127 per column, no zero point (ONNX opset 19: fp16 scales).
- ``int4``: signed INT4 with 2-D block scales ``[in / block, out]`` (``block_size`` on
  axis 0, ONNX opset 21), scale = max|w| / 7 per block and column, codes clipped to
  [-8, 7], no zero point; the LM head (and any projection whose input width the block
  does not divide) is INT8 per channel, like the onnx int4 recipe's 8-bit LM head.

Scales are positive (``max|w| / qmax``); MatMulNBits' symmetric grid instead divides the
signed extreme by -8 (scales of either sign, one more level on one side), so these
codes are this module's round-to-nearest, not a copy of the onnx int4 file's GPTQ codes.
The float type around them (scales, activations) is fp16, TensorRT's default.
Rounding is round-half-to-even (numpy), as TensorRT's quantize is.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..core.names import ONNX_QUANTIZED
from .onnx_decoder import _external, _to_numpy
from .tensorrt_decoder import _TrtDecoderBuilder

QUANT_PRECISIONS = tuple(p.value for p in ONNX_QUANTIZED)
BLOCKED_OPSET = 21
FP16_SCALE_OPSET = 19
DEFAULT_BLOCK = 128  # TensorRT's INT4 weight-only GEMMs take 64 or 128; 128 is what ModelOpt writes for GPUs


def pack_int4(codes: np.ndarray) -> bytes:
    """Signed 4-bit codes (int8 in [-8, 7]) packed two per byte, element 0 in the low nibble (ONNX INT4)."""
    flat = (codes.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def quantize_int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [in, out] -> (int8 codes [in, out], scales [out]) with scale = max|w| / 127 per column."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def quantize_int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [in, out] -> (codes in [-8, 7] [in, out], scales [in / block, out]), blocks along ``in``."""
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    scale = np.abs(blocks).max(axis=1) / 7.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8)
    return codes.reshape(k, n), scale


class QuantizedTrtDecoderBuilder(_TrtDecoderBuilder):
    """:class:`_TrtDecoderBuilder` whose projections are stored INT8 / INT4 (see the module doc)."""

    quant = "int8"
    block = DEFAULT_BLOCK

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # DequantizeLinear takes fp16 scales from opset 19 (within TensorRT 10.3's documented 9-20);
        # block_size needs 21
        self.opset = BLOCKED_OPSET if self.quant == "int4" else FP16_SCALE_OPSET
        self.qweights: dict[str, tuple[str, str, int]] = {}  # key -> (codes, scales, block or 0)
        self.counts = {"int4": 0, "int8": 0}

    def _linear(self, key, names, outs, in_features) -> None:
        parts = [_to_numpy(self._get(n, (o, in_features))).astype(np.float32) for n, o in zip(names, outs)]
        w = np.concatenate(parts, axis=0).T.copy()  # [in, out]
        del parts
        g = self.g
        blocked = self.quant == "int4" and key != "lm_head.weight" and in_features % self.block == 0
        if blocked:
            codes, scale = quantize_int4_blocks(w, self.block)
            data, qtype = pack_int4(codes), TensorProto.INT4
        else:
            codes, scale = quantize_int8_columns(w)
            data, qtype = codes.tobytes(), TensorProto.INT8
        offset, length = g.data.append([data], len(data))
        q_name = f"{key}.{'int4' if blocked else 'int8'}"
        g.initializers.append(_external_typed(q_name, qtype, w.shape, g.location, offset, length))
        g.weight_bytes += length
        s_name = g.weight(f"{key}.scale", scale.shape, self.dtype, iter([scale.astype(self.dtype)]))
        self.qweights[key] = (q_name, s_name, self.block if blocked else 0)
        self.weights[key] = q_name
        self.counts["int4" if blocked else "int8"] += 1

    def weight_value(self, key: str) -> str:
        if key not in self.qweights:
            return self.weights[key]
        if key not in self.dequantized:
            q, s, block = self.qweights[key]
            attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
            self.dequantized[key] = self.g.op("DequantizeLinear", [q, s], f"{key}.dequantize", **attrs)
        return self.dequantized[key]


def _external_typed(name: str, data_type: int, shape, location: str, offset: int, length: int) -> TensorProto:
    t = _external(name, np.float32, shape, location, offset, length)
    t.data_type = data_type
    return t


def quantized_builder(precision: str, block: int = DEFAULT_BLOCK) -> type[QuantizedTrtDecoderBuilder]:
    if precision not in QUANT_PRECISIONS:
        raise ValueError(f"quantized TensorRT-profile precision must be one of {QUANT_PRECISIONS}, got {precision!r}")
    if block not in (32, 64, 128):
        raise ValueError(f"INT4 block size must be 32, 64 or 128, got {block}")
    return type(f"TrtDecoderBuilder_{precision}", (QuantizedTrtDecoderBuilder,), {"quant": precision, "block": block})
